"""Generation with a KV cache: batched (for evaluation and `unitune generate`) and streaming (chat)."""
from __future__ import annotations

import threading
from collections.abc import Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteriaList, TextIteratorStreamer

from unitune.models.loader import end_of_turn_ids


def _settings(tok: PreTrainedTokenizerBase, max_new_tokens: int, temperature: float, top_p: float) -> dict:
    sampling = temperature > 0
    kw = dict(max_new_tokens=max_new_tokens, do_sample=sampling, eos_token_id=end_of_turn_ids(tok),
              pad_token_id=tok.pad_token_id, use_cache=True)
    if sampling:
        kw.update(temperature=temperature, top_p=top_p)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    return kw


def _encode(tok: PreTrainedTokenizerBase, conversations: list[list[dict]], device) -> dict:
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    tok.padding_side = "left"  # new tokens follow every prompt directly
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)


@torch.no_grad()
def generate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, conversations: list[list[dict]],
             max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             batch_size: int = 16, progress: bool = False) -> list[str]:
    """Answer each conversation (a list of {role, content}) with the assistant's next turn."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Longest prompts first: batches of similar length waste less on padding.
    order = sorted(range(len(conversations)), key=lambda i: -len(str(conversations[i])))
    out: list[str] = [""] * len(conversations)
    batches = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generate", unit="batch")
    for b in batches:
        idx = order[b : b + batch_size]
        enc = _encode(tok, [conversations[i] for i in idx], device)
        seqs = model.generate(**enc, **_settings(tok, max_new_tokens, temperature, top_p))
        for i, seq in zip(idx, seqs[:, enc["input_ids"].shape[1]:]):
            out[i] = tok.decode(seq, skip_special_tokens=True).strip()
    model.train(was_training)
    return out


def stream(model: PreTrainedModel, tok: PreTrainedTokenizerBase, conversation: list[dict],
           max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9) -> Iterator[str]:
    """Yield the reply piece by piece as it is generated; an error while generating is raised here."""
    model.eval()
    device = next(model.parameters()).device
    enc = _encode(tok, [conversation], device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    reader_left = threading.Event()  # early (Ctrl-C): stop generating rather than finish unread
    stop = StoppingCriteriaList([lambda ids, scores, **_: torch.full((len(ids),), reader_left.is_set(),
                                                                     device=ids.device)])
    kw = {**enc, **_settings(tok, max_new_tokens, temperature, top_p), "streamer": streamer, "stopping_criteria": stop}
    failed: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(**kw)
        except BaseException as err:  # re-raised in the reader below
            failed.append(err)
            # Without a stop signal the reader waits on the queue forever. end() would decode the
            # token cache first, which may be what failed.
            streamer.on_finalized_text("", stream_end=True)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield from streamer
    finally:
        reader_left.set()
        thread.join()
    if failed:
        raise failed[0]

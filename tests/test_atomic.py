"""Atomic writes: whatever moment a kill comes, a reader finds the old copy or the new one."""
import pytest

from unitune import atomic


def test_write_text_replaces_whole_and_leaves_no_temp(tmp_path):
    path = tmp_path / "recipe.yaml"
    atomic.write_text(path, "a: 1\n")
    atomic.write_text(path, "a: 2\n")
    assert path.read_text() == "a: 2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"]


def test_directory_swaps_in_only_when_complete(tmp_path):
    out = tmp_path / "adapter"
    with atomic.directory(out) as tmp:
        (tmp / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.directory(out) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed while writing")
    assert (out / "weights").read_text() == "old"  # the failed write never touched the output
    with atomic.directory(out) as tmp:
        (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_recover_after_a_kill_between_the_two_renames(tmp_path):
    # The old output was renamed aside, the new one was still under its temp name.
    (tmp_path / "adapter.old").mkdir()
    (tmp_path / "adapter.old" / "weights").write_text("old")
    (tmp_path / "adapter.tmp").mkdir()
    (tmp_path / ".metrics.jsonl.123.tmp").write_text("torn")
    atomic.recover(tmp_path)
    assert (tmp_path / "adapter" / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_remove_tree_never_leaves_a_half_deleted_directory_under_its_name(tmp_path, monkeypatch):
    victim = tmp_path / "step-3"
    victim.mkdir()
    (victim / "trainer.json").write_text("{}")
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda *a, **k: None)  # killed before deleting anything
    atomic.remove_tree(victim)
    assert not victim.exists()
    monkeypatch.undo()
    atomic.recover(tmp_path)  # the renamed-aside leftover is swept, not restored
    assert list(tmp_path.iterdir()) == []

"""The streamed experts' one host copy per node (mtg_core.moe.shared_host): local ranks driven by threads of one
process here (each NodeShare is told its local rank), two torchrun processes in tests/test_distributed.py."""

import json
import os
import socket
import subprocess
import threading

import pytest
import torch

from mtg_core.errors import BaseModelError
from mtg_core.moe import shared_host, streaming

LAYERS = (1, 4)
SIZES = (5000, 7000, 3000)  # one layer's packed matrices (bytes): not a whole number of pages


def packed(seed):
    """A layer's packed matrices as one rank's quantisation made them (each rank's own tensors, equal across ranks)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=generator) for n in SIZES]


def run_rank(share, layers, seeds=None, out=None):
    """What load_streamed_experts does with a share: each layer's host copy, then finish (close on any failure)."""
    try:
        hosts = {index: streaming.host_copy(packed((seeds or {}).get(index, index)), False, share, index)[0] for index in layers}
        share.finish()
    except BaseModelError as exc:
        if out is not None:
            out["error"] = str(exc)
            return None
        raise
    finally:
        share.close()
    if out is not None:
        out["hosts"] = hosts
    return hosts


def two_ranks(folder, layers0=LAYERS, layers1=LAYERS, seeds0=None):
    """Local rank 0 in a thread, local rank 1 here, as two processes of one node would run."""
    prefix = f"mtg-experts-{os.geteuid()}-test"
    out0 = {}
    thread = threading.Thread(target=lambda: run_rank(shared_host.NodeShare(folder, prefix, list(layers0), sum(SIZES), print, 0, 2),
                                                      layers0, seeds0, out0))
    thread.start()
    out1 = {}
    try:
        run_rank(shared_host.NodeShare(folder, prefix, list(layers1), sum(SIZES), print, 1, 2), layers1, None, out1)
    finally:
        thread.join()
    return out0, out1


def test_two_local_ranks_map_one_copy_and_the_folder_is_left_empty(tmp_path):
    rank0, rank1 = two_ranks(tmp_path)
    assert "error" not in rank0 and "error" not in rank1, (rank0, rank1)
    for index in LAYERS:
        first, second = rank0["hosts"][index], rank1["hosts"][index]
        assert torch.equal(first, torch.cat(packed(index))) and torch.equal(second, first)
        assert first.data_ptr() != second.data_ptr()  # two mappings ...
        first[0] ^= 0xFF  # ... of the same pages: a write through one is seen through the other
        assert second[0] == first[0]
    assert list(tmp_path.iterdir()) == []  # unlinked once both had mapped them; the mappings stay valid


def test_a_layer_that_local_rank_0_does_not_stream_stays_private(tmp_path):
    rank0, rank1 = two_ranks(tmp_path, layers0=(1,), layers1=(1, 4))
    assert "error" not in rank1, rank1
    assert torch.equal(rank1["hosts"][4], torch.cat(packed(4)))
    rank0["hosts"][1][0] ^= 0xFF
    assert rank1["hosts"][1][0] == rank0["hosts"][1][0]  # layer 1 shared, layer 4 this rank's own
    assert list(tmp_path.iterdir()) == []


def test_a_rank_that_quantised_other_weights_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(shared_host, "WAIT_S", 0.5)
    rank0, rank1 = two_ranks(tmp_path, seeds0={4: 99})
    assert "differ from this rank's quantisation" in rank1["error"] and ".L4" in rank1["error"] and "\n" not in rank1["error"]
    assert "local rank 1's word that it mapped" in rank0["error"] and "within 0.5 s" in rank0["error"]
    assert list(tmp_path.iterdir()) == []  # local rank 0 removes what it wrote when it fails


def test_waiting_for_local_rank_0_ends_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(shared_host, "WAIT_S", 0.2)
    with pytest.raises(BaseModelError) as error:
        shared_host.NodeShare(tmp_path, "mtg-experts-0-x", [1], 100, print, 1, 2)
    message = str(error.value)
    assert message.startswith(str(tmp_path / "mtg-experts-0-x.manifest")) and "local rank 0 did not write" in message
    assert "MTG_SHM_DIR" in message and "\n" not in message


def dead_pid():
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def our_file(path, pid, host=None, data=b""):
    header = shared_host.MAGIC + json.dumps({"pid": pid, "host": host or socket.gethostname()}).encode() + b"\n"
    path.write_bytes(header + data)
    return path


def test_only_our_leftovers_with_a_dead_writer_are_removed(tmp_path):
    uid, dead = os.geteuid(), dead_pid()
    stale = our_file(tmp_path / f"mtg-experts-{uid}-old.L3", dead, data=b"\0" * 5000)
    stale_tmp = our_file(tmp_path / f"mtg-experts-{uid}-old.L5.tmp", dead)
    kept = [
        our_file(tmp_path / f"mtg-experts-{uid}-live.L3", os.getpid()),  # a live run's
        our_file(tmp_path / f"mtg-experts-{uid}-far.L3", dead, host="another-host"),  # a PID of another machine
        our_file(tmp_path / "someone-elses.L3", dead),  # not our name
        our_file(tmp_path / f"mtg-experts-{uid + 1}-old.L3", dead),  # another user's name
    ]
    foreign = tmp_path / f"mtg-experts-{uid}-x.L0"
    foreign.write_text("not written by mtg-core")
    target = our_file(tmp_path.parent / f"{tmp_path.name}-target", dead)
    link = tmp_path / f"mtg-experts-{uid}-link.L0"
    link.symlink_to(target)
    logged = []
    removed = shared_host.remove_stale(tmp_path, logged.append)
    assert sorted(removed) == sorted([stale, stale_tmp]) and not stale.exists() and not stale_tmp.exists()
    assert all(path.exists() for path in [*kept, foreign, link, target])
    assert any(f"PID {dead}" in line for line in logged)


def test_a_planted_file_or_link_is_never_written_through(tmp_path):
    target = tmp_path / "target"
    target.write_text("theirs")
    prefix = f"mtg-experts-{os.geteuid()}-planted"
    (tmp_path / f"{prefix}.manifest.tmp").symlink_to(target)
    with pytest.raises(BaseModelError) as error:
        shared_host.NodeShare(tmp_path, prefix, [1], 100, print, 0, 2)
    assert "exists and this run did not write it" in str(error.value) and "\n" not in str(error.value)
    assert target.read_text() == "theirs" and (tmp_path / f"{prefix}.manifest.tmp").is_symlink()


def test_a_full_shared_memory_folder_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(shared_host, "free_bytes", lambda folder: 10 * 1024**2)
    with pytest.raises(BaseModelError) as error:
        shared_host.NodeShare(tmp_path, "mtg-experts-0-full", list(range(32)), 672 * 1024**2, print, 0, 2)
    assert "0.01 GiB free" in str(error.value) and "--shm-size" in str(error.value) and "MTG_SHM_DIR" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_one_process_keeps_its_copy_private_and_the_plan_counts_host_ram_per_node(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("MTG_SHM_DIR", str(tmp_path))
    assert shared_host.node_share("somewhere", [1], 100, print) is None
    assert shared_host.node_host_budget(64 * 1024**3) == 64 * 1024**3
    assert shared_host.free_bytes(tmp_path) > 0 and shared_host.free_bytes(tmp_path / "missing") is None
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # not halved: one copy for both ranks, bounded by the folder's room
    monkeypatch.setattr(shared_host, "free_bytes", lambda folder: 5 * 1024**3 if folder == tmp_path else None)
    assert shared_host.node_host_budget(64 * 1024**3) == 5 * 1024**3
    assert shared_host.node_host_budget(1024) == 1024
    monkeypatch.setenv("MTG_SHM_DIR", str(tmp_path / "missing"))
    assert shared_host.node_host_budget(64 * 1024**3) == 0  # nowhere to share it: the plan says the host does not fit


def test_the_plan_under_torchrun_counts_the_streamed_experts_once_per_node(monkeypatch):
    from click.testing import CliRunner

    from mtg_core.commands.train import train_command

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    args = ["--expert", "explain", "--base-model", "mixtral-8x7b", "--plan", "--batch-size", "1", "--seq-len", "512",
            "--gpu-memory", "8", "--host-memory", "32"]
    plan = json.loads(CliRunner().invoke(train_command, [*args, "--json"]).output)
    assert plan["host_free_bytes"] == 32 * 1024**3 and plan["fits"]  # 21 GiB once, not 2 x 21 GiB in 2 x 16 GiB
    text = CliRunner().invoke(train_command, args).output
    assert "per process of 2 (each holds the whole base; the streamed experts' pinned host memory is one copy shared by the 2 processes on this node)" in text

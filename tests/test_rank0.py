"""train/rank0.py's helpers with two real ranks (two processes on a gloo group): whatever rank 0
raises while working alone, or any rank while working on its own share, reaches every rank, so none
waits in a collective until a timeout. And run_dir.check_shared_out_dir, which refuses an out_dir
that only some ranks see."""
import textwrap

import pytest

import warm

pytestmark = pytest.mark.slow

WORKER = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, os.getcwd())
    from train.rank0 import on_every_rank, on_rank0
    from errors import DataError
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=rank, world_size=2)
    def work(kind, name):
        if kind == "json":
            return json.loads("{not json")  # a ValueError that is not bad input: a bug or a broken file
        if kind == "data":
            raise DataError(f"{name}: line 3: malformed JSON")
        return {"read": name}
    for kind in ("ok", "json", "data"):
        try:
            result = on_rank0(work, torch.device("cpu"), "read metrics.jsonl", kind, "pairs.jsonl")
            print(kind, "result", json.dumps(result))
        except Exception as err:
            print(kind, "raised", type(err).__name__, err)
        dist.barrier()  # both ranks get here: nobody is left waiting
    def score(failing_ranks, error):  # each rank's own share: a rank in failing_ranks raises
        if rank in failing_ranks:
            raise error(f"rank {rank}'s reward model is unreadable")
        return [float(rank)] * 3  # not JSON-able work in general: never sent
    for kind, failing_ranks, error in (("own", (), None), ("one", (1,), OSError), ("both", (0, 1), ValueError),
                                       ("bad", (1,), DataError)):
        try:
            result = on_every_rank(score, torch.device("cpu"), "score its rollouts", failing_ranks, error)
            print("every", kind, "result", json.dumps(result))
        except Exception as err:
            print("every", kind, "raised", type(err).__name__, err)
        dist.barrier()
    from train.run_dir import check_shared_out_dir
    for shared in (True, False):  # one out_dir for both ranks, or one per "node" (a node-local disk)
        out_dir = os.path.join(sys.argv[3], "shared" if shared else f"node{rank}")
        os.makedirs(out_dir, exist_ok=True)
        try:
            check_shared_out_dir(out_dir, torch.device("cpu"))
            dist.barrier()  # rank 0 has removed its probe file
            print("shared", shared, "ok", sorted(os.listdir(out_dir)))
        except Exception as err:
            print("shared", shared, "raised", type(err).__name__, err)
            dist.barrier()
    dist.destroy_process_group()  # before exit: a rank outliving the store's host aborts in gloo's threads
    print("done")
""")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The output of rank 0 and rank 1, each having called on_rank0 with the three kinds of work,
    on_every_rank with four, then check_shared_out_dir on a shared out_dir and on per-rank ones."""
    port, out_dir = str(warm.free_port()), str(tmp_path_factory.mktemp("out"))
    worker = tmp_path_factory.mktemp("worker") / "worker.py"
    worker.write_text(WORKER)
    ranks = [warm.popen([str(worker), str(rank), port, out_dir]) for rank in (0, 1)]  # started warm
    outputs = [rank.communicate(timeout=60)[0] for rank in ranks]
    assert all(rank.returncode == 0 and "done" in out for rank, out in zip(ranks, outputs)), outputs
    return outputs


def test_rank0_result_reaches_every_rank(two_ranks):
    assert all('ok result {"read": "pairs.jsonl"}' in out for out in two_ranks), two_ranks


def test_any_rank0_exception_reaches_every_rank(two_ranks):
    rank0, rank1 = two_ranks
    assert "json raised JSONDecodeError" in rank0  # rank 0 keeps its own exception (and traceback)
    assert "json raised RuntimeError rank 0 could not read metrics.jsonl: JSONDecodeError" in rank1


def test_bad_input_on_rank0_is_bad_input_on_every_rank(two_ranks):
    rank0, rank1 = two_ranks
    assert "data raised DataError pairs.jsonl: line 3: malformed JSON" in rank0
    assert "data raised InputError pairs.jsonl: line 3: malformed JSON" in rank1  # one line, exit 2 there too


def test_an_out_dir_that_not_every_rank_sees_is_refused_on_every_rank(two_ranks):
    assert all("shared True ok []" in out for out in two_ranks), two_ranks  # and the probe file is gone
    assert all("shared False raised ConfigError" in out and "shared filesystem" in out for out in two_ranks)


def test_each_rank_keeps_its_own_result_of_its_own_share(two_ranks):
    rank0, rank1 = two_ranks
    assert "every own result [0.0, 0.0, 0.0]" in rank0 and "every own result [1.0, 1.0, 1.0]" in rank1


def test_an_exception_on_one_rank_of_every_rank_s_work_reaches_the_others(two_ranks):
    """Rank 1 fails alone: it keeps its own exception, and rank 0, which would otherwise go on into
    the next forward's all-gather and wait there, raises one naming rank 1 and its error. Both
    failing: each keeps its own. Bad input on rank 1 is bad input on rank 0 too."""
    rank0, rank1 = two_ranks
    assert "every one raised OSError rank 1's reward model is unreadable" in rank1
    assert ("every one raised RuntimeError rank 1 could not score its rollouts: "
            "OSError: rank 1's reward model is unreadable") in rank0
    assert "every both raised ValueError rank 0's reward model" in rank0
    assert "every both raised ValueError rank 1's reward model" in rank1
    assert "every bad raised DataError rank 1's reward model is unreadable" in rank1
    assert "every bad raised InputError rank 1's reward model is unreadable" in rank0

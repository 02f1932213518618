"""What keeps every rank in step when one rank's own work fails: rank 0 working alone (reads a file,
writes one: on_rank0), or every rank working on its own share (scores its rollouts: on_every_rank).
The result, or the exception, reaches every rank through a broadcast (no pickling), so no rank waits
in its next collective until a timeout.
"""
import json

import torch
import torch.distributed as dist

from errors import BAD_INPUT, InputError


def broadcast_json(obj, device, src=0):
    """Rank src's JSON-able object on every rank, sent as UTF-8 bytes (no pickling)."""
    data = json.dumps(obj).encode() if dist.get_rank() == src else b""
    size = torch.tensor([len(data)], device=device)
    dist.broadcast(size, src=src)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == src:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, src=src)
    return json.loads(bytes(buffer.cpu().tolist()).decode())


def failure_report(failure):
    """What the other ranks are told of an exception: its type and message, and whether it is bad input."""
    return {"error": f"{type(failure).__name__}: {failure}", "bad_input": isinstance(failure, BAD_INPUT)}


def raise_reported(report, who, what):
    """On a rank that did not fail: bad input stays bad input (one line, exit 2); anything else names
    the rank that failed and what it was doing."""
    if report["bad_input"]:
        raise InputError(str(report["error"]).split(": ", 1)[1])
    raise RuntimeError(f"{who} could not {what}: {report['error']}")


def on_rank0(fn, device, what, *args):
    """Collective: rank 0 runs fn(*args) and every rank returns its (JSON-able) result.

    If fn raises, whatever the exception, rank 0 re-raises it and every other rank raises too
    (the same message; bad input stays bad input), instead of waiting in its next collective until
    a timeout. `what` names the work in the other ranks' message.
    """
    result, failure = None, None
    if dist.get_rank() == 0:
        try:
            result = fn(*args)
            json.dumps(result)  # a result that can't be sent fails here, on rank 0, and is told too
        except Exception as err:  # told to the other ranks below, then re-raised as it is
            failure = err
    reply = broadcast_json({"result": result, "failure": None} if failure is None else
                           {"result": None, "failure": failure_report(failure)}, device)
    if failure is not None:
        raise failure
    if reply["failure"] is not None:
        raise_reported(reply["failure"], "rank 0", what)
    return reply["result"]


def on_every_rank(fn, device, what, *args):
    """Collective: every rank runs fn(*args) on its own share and returns its own result (anything,
    never sent). If fn raises on any rank, that rank re-raises its exception and every other rank
    raises too, told by the lowest failing rank (bad input stays bad input), instead of waiting in
    its next collective until a timeout. One all-reduce of one number when nothing fails."""
    result, failure = None, None
    try:
        result = fn(*args)
    except Exception as err:  # told to the other ranks below, then re-raised as it is
        failure = err
    world = dist.get_world_size()
    first_failing = torch.tensor([world if failure is None else dist.get_rank()], device=device)
    dist.all_reduce(first_failing, op=dist.ReduceOp.MIN)
    src = int(first_failing.item())
    if src == world:
        return result
    report = broadcast_json(failure_report(failure) if dist.get_rank() == src else None, device, src=src)
    if failure is not None:
        raise failure
    raise_reported(report, f"rank {src}", what)

"""What keeps every rank in step when rank 0 does something alone (reads a file, writes one) and it
fails: its result, or its exception, reaches every rank through one broadcast (no pickling).
"""
import json

import torch
import torch.distributed as dist

from errors import BAD_INPUT, InputError


def broadcast_json(obj, device):
    """Rank 0's JSON-able object on every rank, sent as UTF-8 bytes (no pickling)."""
    data = json.dumps(obj).encode() if dist.get_rank() == 0 else b""
    size = torch.tensor([len(data)], device=device)
    dist.broadcast(size, src=0)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == 0:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    return json.loads(bytes(buffer.cpu().tolist()).decode())


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
    reply = broadcast_json({"result": result if failure is None else None,
                            "error": None if failure is None else f"{type(failure).__name__}: {failure}",
                            "bad_input": isinstance(failure, BAD_INPUT)}, device)
    if failure is not None:
        raise failure
    if reply["error"] is not None:
        if reply["bad_input"]:
            raise InputError(str(reply["error"]).split(": ", 1)[1])
        raise RuntimeError(f"rank 0 could not {what}: {reply['error']}")
    return reply["result"]

"""Loading a torch.distributed.checkpoint (DCP) checkpoint without executing anything from its files.

DCP reads a checkpoint's .metadata with plain pickle, and every non-tensor value in it (the
optimizer's param_groups: lr, betas, ...) with torch.load and weights_only=False. A crafted file
would run whatever it asks for on resume, and the sha256 in train_state.json does not stop that:
whoever can write the file can recompute it. So here:

- .metadata is read by MetadataUnpickler, which builds only the classes DCP's Metadata is made of
  (ALLOWED_GLOBALS, read off real .metadata files with pickletools) and refuses any other global
  with an error naming the file and the global. Nothing runs but those classes' constructors.
- non-tensor values are read with torch.load(weights_only=True), PyTorch's own restricted
  unpickler (plain Python values, containers, tensors), which executes nothing. DCP already reads
  the tensors that way.
- every data file the metadata names must be a plain file name inside the checkpoint directory.
"""
import io
import os
import pickle
import re

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from errors import CheckpointError

METADATA_CLASSES = ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                    "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
ALLOWED_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in METADATA_CLASSES),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # where an entry lies in a .distcp file
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # torch.strided pickles as _get_layout("torch.strided"): a look-up
    ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath"),  # StorageMeta.checkpoint_id (Python 3.13 moved it)
    ("collections", "OrderedDict"),
}
# and the dtypes (torch.float32 pickles as the global torch.float32): admitted by type in find_class


class MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only ALLOWED_GLOBALS and torch dtypes; anything else (os.system,
    builtins.eval, a class with a malicious __reduce__...) is refused before it can be called."""

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        # vars(), not getattr(): torch's module __getattr__ would import whatever submodule is named
        if (module, name) in ALLOWED_GLOBALS or (module == "torch" and isinstance(vars(torch).get(name), torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"{self.path}: refused to unpickle {module}.{name}: it is not one of the classes DCP "
                              "checkpoint metadata is made of, so this file was crafted or comes from elsewhere. "
                              "Nothing was run; delete this checkpoint or point out_dir elsewhere.")


def read_checked_metadata(checkpoint_dir) -> Metadata:
    """The checkpoint's .metadata, read with MetadataUnpickler and checked; CheckpointError names the file."""
    path = os.path.join(checkpoint_dir, ".metadata")
    with open(path, "rb") as f:
        try:
            metadata = MetadataUnpickler(f, path).load()
        except CheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError) as err:
            raise CheckpointError(f"{path}: not a readable DCP metadata file ({type(err).__name__}: {err})") from err
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP checkpoint metadata")
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise CheckpointError(f"{path}: names the data file {name!r}, which is not a file of the checkpoint "
                                  "directory")
    if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
        metadata.storage_meta = StorageMeta()
    return metadata


class CheckedMetadataReader(FileSystemReader):
    """DCP's FileSystemReader, handing DCP the metadata read_checked_metadata() already read
    instead of unpickling the file with plain pickle."""

    def __init__(self, checkpoint_dir, metadata: Metadata):
        super().__init__(checkpoint_dir)
        self.metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's DefaultLoadPlanner, but non-tensor values are unpickled with weights_only=True."""

    def __init__(self, checkpoint_dir, metadata: Metadata):
        super().__init__()
        self.checkpoint_dir, self.checked_metadata = checkpoint_dir, metadata

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            file = os.path.join(self.checkpoint_dir,
                                self.checked_metadata.storage_data[read_item.storage_index].relative_path)
            asked = re.search(r"GLOBAL (\S+)", str(err))  # torch's message: "Unsupported global: GLOBAL io.open ..."
            problem = f"it asks for {asked.group(1)}" if asked else "it is not a pickle of plain values"
            raise CheckpointError(f"{file}: refused to unpickle the entry {read_item.dest_index.fqn}: {problem}, so "
                                  "this file was crafted or comes from elsewhere. Nothing was run; delete this "
                                  "checkpoint or point out_dir elsewhere.") from None
        # DefaultLoadPlanner.load_bytes puts a value in place, but unpickles it with weights_only=False: hand it
        # a pickle of what weights_only admitted (plain values only), which rebuilds them and runs nothing else.
        plain = io.BytesIO()
        torch.save(loaded, plain)
        plain.seek(0)
        super().load_bytes(read_item, plain)


def load(state: dict, checkpoint_dir):
    """Collective: dcp.load of state from checkpoint_dir, unpickling nothing but plain data.
    A refused file raises CheckpointError on every rank; DCP's other failures propagate as they are."""
    metadata = read_checked_metadata(checkpoint_dir)  # every rank reads the same file, so all refuse it alike
    try:
        dcp.load(state, storage_reader=CheckedMetadataReader(checkpoint_dir, metadata),
                 planner=WeightsOnlyLoadPlanner(checkpoint_dir, metadata))
    except dcp.CheckpointException as err:  # a BaseException holding every rank's failure
        refused = [failure[0] for failure in err.failures.values() if isinstance(failure[0], CheckpointError)]
        if refused:
            raise CheckpointError(str(refused[0])) from None
        raise

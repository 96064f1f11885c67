"""Read back what W&B wrote offline: the records of a run's .wandb file (there is no W&B server here to ask).

The file is W&B's record log: a 7-byte header (":W&B", a 2-byte magic number, a version byte), then blocks of
32 KiB in LevelDB's log format (each piece of a record: a 4-byte checksum, a 2-byte length, a 1-byte type, the
bytes), each record a protocol buffer of wandb's own `Record` type.
"""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B record log"
    position, pieces = 7, []
    while position + 7 <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < 7:  # too small for a header: padding
            position += left_in_block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:  # zeros: the end of what was written
            break
        pieces.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            yield record


def run_files(out_dir):
    """The .wandb file of every offline piece of runs under out_dir/wandb, oldest first."""
    return sorted(Path(out_dir, "wandb").glob("offline-run-*/run-*.wandb"))


def history(path):
    """[{key: value}] of every wandb.log call, in order; an image is its description, under keys such as
    `<name>/_type` ("image-file") and `<name>/path`."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})  # fmt: skip
    return rows


def run_record(path):
    """The run's id, name, group, config, project, entity and sweep, as written when it started."""
    for record in records(path):
        if record.WhichOneof("record_type") == "run":
            run = record.run
            config = {item.key: json.loads(item.value_json) for item in run.config.update}
            return {"id": run.run_id, "name": run.display_name, "group": run.run_group, "config": config,
                    "project": run.project, "entity": run.entity, "sweep_id": run.sweep_id}
    raise AssertionError(f"no run record in {path}")

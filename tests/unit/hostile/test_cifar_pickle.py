"""Hostile inputs, classes 2 and 3 (issue 21): a CIFAR batch file can neither run code nor crash us.

The fuzz test mutates a valid tiny batch 1000 times (truncation, byte flips, opcode swaps, forged
dtype and shape payloads) and parses every mutant in ONE subprocess, so a segfault or any other
signal fails the test instead of killing pytest. Each mutant must load or end in a ValueError whose
one-line message is what the CLI prints after `error: `. Runs in a few seconds.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap

import numpy as np

from data_prep.cli import main

BATCH_NAMES = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]


def valid_batch(rows: int = 2, dtype=np.uint8, protocol: int = 2) -> bytes:
    data = np.arange(rows * 3072).astype(dtype).reshape(rows, 3072)
    batch = {
        b"batch_label": b"testing",
        b"labels": list(range(rows)),
        b"data": data,
        b"filenames": [b"a"] * rows,
    }
    return pickle.dumps(batch, protocol=protocol)


def forged_flags(raw: bytes, flags: int) -> bytes:
    """The dtype state's last field (flags, 0 for plain numbers) set to `flags`."""
    tail = b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"
    assert raw.count(tail) == 1
    return raw.replace(tail, tail[:-2] + bytes([flags]) + b"t")


def run_cli_in_subprocess(tmp_path, raw: bytes) -> subprocess.CompletedProcess:
    folder = tmp_path / "in" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in BATCH_NAMES:
        (folder / name).write_bytes(raw)
    args = ["cifar10", "--input", str(folder), "--output", str(tmp_path / "out"), "--no-progress"]
    code = f"import sys; from data_prep.cli import main; sys.exit(main({args!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_forged_dtype_flags_is_an_error_not_a_segfault(tmp_path):
    """numpy's own rebuilders with dtype flags saying 'holds object pointers' read the file's bytes
    as pointers; the restricted unpickler allowed exactly those rebuilders."""
    raw = forged_flags(valid_batch(dtype=np.uint64), 0x3F)
    proc = run_cli_in_subprocess(tmp_path, raw)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "data_batch_1" in lines[0], proc.stderr


def test_declared_shape_larger_than_the_bytes_is_refused(tmp_path, capsys):
    raw = valid_batch()
    # the state's shape (2, 3072) is BININT1 2, BININT2 3072: claim 2**31 - 1 rows instead
    shape = b"K\x02M\x00\x0c\x86"
    assert raw.count(shape) == 1
    raw = raw.replace(shape, b"J\xff\xff\xff\x7fM\x00\x0c\x86")
    folder = tmp_path / "in" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in BATCH_NAMES:
        (folder / name).write_bytes(raw)
    assert main(["cifar10", "--input", str(folder), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "data_batch_1" in err and "6144" in err, err


FUZZ = textwrap.dedent(
    """
    import json, pickletools, random, sys
    from pathlib import Path
    from data_prep.cli import error_line
    from data_prep.sources.cifar10 import load_batch

    work = Path(sys.argv[1])
    raw = (work / "valid").read_bytes()
    forged = [bytes.fromhex(h) for h in json.loads((work / "forged.json").read_text())]
    rng = random.Random(21)
    starts = [pos for _, _, pos in pickletools.genops(raw)]
    codes = sorted({raw[p] for p in starts})
    outcomes = {"loaded": 0, "error": 0}
    for i in range(1000):
        kind = i % 4
        data = bytearray(raw)
        if kind == 0:
            data = data[: rng.randrange(len(data))]
        elif kind == 1:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 2:
            for _ in range(rng.randint(1, 3)):
                data[rng.choice(starts)] = rng.choice(codes)
        else:
            data = bytearray(forged[i // 4 % len(forged)])
            if i // 4 >= len(forged):
                data[rng.randrange(len(data))] = rng.randrange(256)
        path = work / f"batch_{i % 8}"
        path.write_bytes(bytes(data))
        load_batch.cache_clear()
        try:
            load_batch(path)
            outcomes["loaded"] += 1
        except ValueError as exc:
            line = error_line(exc)
            assert "\\n" not in line and str(path) in line, (i, line)
            outcomes["error"] += 1
    print(json.dumps(outcomes))
    """
)


def test_fuzzed_cifar_batches_never_crash(tmp_path):
    raw = valid_batch()
    forged = [
        forged_flags(valid_batch(dtype=np.uint64), 0x3F),
        forged_flags(raw, 0x3F),
        forged_flags(raw, 0x01),
        raw.replace(b"X\x02\x00\x00\x00u1", b"X\x01\x00\x00\x00O"),  # an object dtype
        valid_batch(dtype=np.float64),
        raw.replace(b"K\x02M\x00\x0c\x86", b"J\xff\xff\xff\x7fJ\xff\xff\xff\x7f\x86"),  # huge shape
        raw.replace(b"K\x02M\x00\x0c\x86", b"K\x03M\x00\x0c\x86"),  # one row more than the bytes
        valid_batch(protocol=5),
    ]
    (tmp_path / "valid").write_bytes(raw)
    (tmp_path / "forged.json").write_text(json.dumps([f.hex() for f in forged]))
    proc = subprocess.run(
        [sys.executable, "-c", FUZZ, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcomes["loaded"] + outcomes["error"] == 1000 and outcomes["error"] > 500, outcomes

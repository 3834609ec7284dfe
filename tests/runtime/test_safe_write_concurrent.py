"""rwkv_runtime.safe_write with writers racing on one output: every write succeeds and the file is
always one writer's complete content (was: a writer failed with 'No such file or directory' when
another moved the old file away between its check and its rename)."""

from __future__ import annotations

import threading

from rwkv_runtime import safe_write


def test_concurrent_writers_of_one_file_all_succeed_and_leave_a_complete_file(tmp_path):
    out = tmp_path / "state.npz"
    out.write_bytes(b"old")
    contents = [bytes([65 + i]) * (1000 + i) for i in range(4)]
    errors: list = []

    def writer(i):
        try:
            for _ in range(40):
                safe_write.write_file(out, lambda p: p.write_bytes(contents[i]))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(repr(e))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert out.read_bytes() in contents
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.npz"]  # no staging folder left

"""Ray's local filesystem: a written file appears whole or not at all (location.whole_files)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.fs as pafs

from stkd_dist.location import pyarrow_filesystem
from stkd_dist.location.whole_files import PARTIAL_SUFFIX


def test_a_file_replaces_the_old_one_only_when_closed(tmp_path: Path) -> None:
    fs, root = pyarrow_filesystem(tmp_path / "run")
    target = f"{root}/deep/state.json"
    with fs.open_output_stream(target) as f:
        f.write(b'{"v": 1}')
    with fs.open_output_stream(target) as f:
        f.write(b'{"v": 2')
        assert (tmp_path / "run" / "deep" / "state.json").read_bytes() == b'{"v": 1}'
        f.write(b"}")
    assert (tmp_path / "run" / "deep" / "state.json").read_bytes() == b'{"v": 2}'
    assert [p.name for p in (tmp_path / "run" / "deep").iterdir()] == ["state.json"]
    # the umask's mode, as a plain open would give (not a private temporary file's 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "run" / "deep" / "state.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_ray_uploads_a_folder_through_it(tmp_path: Path) -> None:
    src = tmp_path / "staging"
    (src / "trial_a").mkdir(parents=True)
    (src / "experiment_state.json").write_text("{}")
    (src / "trial_a" / "progress.csv").write_text("epoch\n0\n")
    fs, root = pyarrow_filesystem(tmp_path / "store")
    # what Ray Tune's driver does at every save of its experiment
    pafs.copy_files(str(src), f"{root}/tune", destination_filesystem=fs)
    with fs.open_append_stream(f"{root}/tune/trial_a/progress.csv") as f:
        f.write(b"1\n")
    assert (tmp_path / "store" / "tune" / "experiment_state.json").read_text() == "{}"
    assert (tmp_path / "store" / "tune" / "trial_a" / "progress.csv").read_text() == "epoch\n0\n1\n"


def test_a_writer_killed_mid_file_leaves_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "tune" / "experiment_state.json"
    target.parent.mkdir()
    target.write_bytes(b'{"complete": true}')
    script = textwrap.dedent(
        f"""
        import sys, time
        from stkd_dist.location import pyarrow_filesystem
        fs, root = pyarrow_filesystem({str(tmp_path / "tune")!r})
        f = fs.open_output_stream(root + "/experiment_state.json")
        f.write(b'{{"compl')
        f.flush()
        print("half written", flush=True)
        time.sleep(600)
        """
    )
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, cwd=repo
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"half written\n"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert target.read_bytes() == b'{"complete": true}'
    (partial,) = [p for p in target.parent.iterdir() if p != target]
    assert partial.name.startswith(".experiment_state.json.")
    assert partial.name.endswith(PARTIAL_SUFFIX)
    assert partial.read_bytes() == b'{"compl'


def test_a_failed_write_publishes_nothing(tmp_path: Path) -> None:
    """A write the OS refuses (here: past the process's file size limit, EFBIG, as a full disk
    refuses with ENOSPC) leaves the previous file and no partial one."""
    target = tmp_path / "experiment_state.json"
    target.write_bytes(b'{"complete": true}')
    script = textwrap.dedent(
        f"""
        import errno, resource, signal
        from stkd_dist.location import pyarrow_filesystem
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        fs, root = pyarrow_filesystem({str(tmp_path)!r})
        try:
            with fs.open_output_stream(root + "/experiment_state.json") as f:
                f.write(b"x" * 1000)
        except OSError as e:
            print("refused", e.errno == errno.EFBIG, flush=True)
        """
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
        cwd=repo,
        timeout=120,
    )
    assert out.stdout == b"refused True\n", out.stderr.decode()[-2000:]
    assert target.read_bytes() == b'{"complete": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["experiment_state.json"]

"""A server's workers die with it, nothing a live worker uses is deleted, the image route touches only
its own file, and a client that never finishes its request's head is cut off (issue #20, defects 3 and 4).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from bentoml_server import free_port, server_process, service_workers

from serving import image_files
from serving.image_files import LOCK_NAME, ImageFiles
from serving.slow_clients import HEADER_TIMEOUT_S
from serving.worker_lifetime import SERVER_PID_ENV

PARTIAL_HEAD = b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # the blank line that would end it never comes


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# Workers die with their server


def test_workers_die_within_seconds_of_a_sigkilled_server_and_free_its_port(tmp_path):
    port = free_port()
    with server_process(tmp_path / "first", port=port, workers="2", torch_threads="1") as (_, process):
        workers = service_workers(process)
        assert len(workers) == 2
        try:
            process.send_signal(signal.SIGKILL)
            process.wait()
            _, alive = psutil.wait_procs(workers, timeout=10)
            assert alive == [], f"workers alive 10 s after their server's SIGKILL: {[p.pid for p in alive]}"
        finally:
            for worker in workers:  # before the fix they live on: never leave them behind
                if worker.is_running():
                    worker.kill()
    assert port_is_free(port)
    with server_process(tmp_path / "second", port=port, torch_threads="1") as (url, _):
        assert url.endswith(f":{port}")


def start_worker_of(server_pid: int) -> subprocess.Popen:
    """A process that sets itself up as worker 1 of the server ``server_pid`` would be, then waits."""
    code = (
        "import time, bentoml; from serving.worker_lifetime import tie_workers_to_server; "
        "bentoml.server_context.worker_index = 1; tie_workers_to_server(); print(1, flush=True); time.sleep(120)"
    )
    environment = {**os.environ, SERVER_PID_ENV: str(server_pid)}
    return subprocess.Popen([sys.executable, "-c", code], env=environment, stdout=subprocess.PIPE)


def test_a_worker_whose_server_died_before_it_started_watching_dies_at_once():
    worker = start_worker_of(2**22 + 1)  # above Linux's largest pid: a server long gone
    try:
        assert worker.wait(timeout=60) == -signal.SIGKILL
    finally:
        worker.kill()


# Nothing a live worker uses is deleted


@pytest.fixture
def temporary_folder(monkeypatch, tmp_path):
    """Image folders go under ``tmp_path``; SHARED_FOLDER_ENV is restored after the test."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv(image_files.SHARED_FOLDER_ENV, "")
    return tmp_path


def hold_folder(folder) -> subprocess.Popen:
    """Another process using ``folder`` through ImageFiles, as a worker does, until it is killed."""
    code = (
        "import sys, time, pathlib; from serving.image_files import ImageFiles; "
        "ImageFiles(pathlib.Path(sys.argv[1])); print(1, flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"1\n"
    return holder


def test_a_new_server_removes_unused_image_folders_of_dead_servers_but_not_one_a_worker_uses(temporary_folder):
    prefix = f"txt2img-images-{socket.gethostname()}-{2**22 + 1}-"  # above Linux's largest pid: no such process
    in_use, unused = temporary_folder / f"{prefix}inuse", temporary_folder / f"{prefix}unused"
    for folder in (in_use, unused):  # as a dead server left them: the processes that marked them in use are gone
        folder.mkdir()
        (folder / LOCK_NAME).touch()
        (folder / f"{0:032d}.png").write_bytes(b"12345")
    holder = hold_folder(in_use)  # an orphaned worker of the dead server
    try:
        image_files.share_image_folder()
        assert in_use.exists() and not unused.exists()
        assert (image_files.server_image_folder() / LOCK_NAME).exists()
    finally:
        holder.kill()
        holder.wait()
    image_files.share_image_folder()  # the next server: nobody uses it any more
    assert not in_use.exists()


def test_a_server_leaves_its_folder_to_a_worker_still_using_it(temporary_folder):
    folder = temporary_folder / "txt2img-images-shared"
    folder.mkdir()
    own_mark = image_files.use_folder(folder)
    holder = hold_folder(folder)
    try:
        assert not image_files.remove_if_unused(folder, own_mark)
        assert folder.exists()
    finally:
        holder.kill()
        holder.wait()
    assert image_files.remove_if_unused(folder)
    assert not folder.exists()


def test_image_files_make_their_folder_again_when_it_vanishes(tmp_path):
    files = ImageFiles(tmp_path / "images", sweep_interval_s=None)
    first = files.add(b"12345", "png")
    image_files.shutil.rmtree(tmp_path / "images")
    assert files.get(first) is None
    second = files.add(b"67890", "webp")
    assert files.get(second).data == b"67890"
    files.sweep()
    assert image_files.remove_if_unused(tmp_path / "images") is False  # this process uses it again


# The image route touches only its own file


@pytest.fixture
def crowded_image_files(tmp_path):
    """ImageFiles on a folder of 20,000 images."""
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(20_000):
        (folder / f"{index:032d}.png").write_bytes(b"x")
    return folder


def forbid_listing(monkeypatch):
    def listing(*args, **kwargs):
        raise AssertionError("the folder was listed")

    monkeypatch.setattr(os, "scandir", listing)
    monkeypatch.setattr(os, "listdir", listing)


def test_get_and_add_read_only_their_own_file_however_many_there_are(crowded_image_files, monkeypatch):
    files = ImageFiles(crowded_image_files, ttl_s=60, sweep_interval_s=None)
    forbid_listing(monkeypatch)
    name = files.add(b"12345", "png")
    assert files.get(name).data == b"12345"
    assert files.get(f"{7:032d}.png").data == b"x"
    an_hour_ago = time.time() - 3600
    os.utime(crowded_image_files / name, (an_hour_ago, an_hour_ago))
    assert files.get(name) is None  # past its time, judged by its own file
    assert (crowded_image_files / name).exists()  # the sweeper's work, not the request's


def test_the_sweeper_thread_removes_expired_images_and_keeps_the_byte_bound(crowded_image_files):
    an_hour_ago = time.time() - 3600
    for index in range(10_000):
        os.utime(crowded_image_files / f"{index:032d}.png", (an_hour_ago, an_hour_ago))
    ImageFiles(crowded_image_files, ttl_s=60, max_bytes=5_000, sweep_interval_s=0.1)
    deadline = time.monotonic() + 120
    while len(os.listdir(crowded_image_files)) > 5_000 + 1:  # the kept images and the lock file
        assert time.monotonic() < deadline, "the sweeper did not sweep"
        time.sleep(0.2)
    assert not (crowded_image_files / f"{9_999:032d}.png").exists()
    assert (crowded_image_files / f"{19_999:032d}.png").exists()  # the newest fit


# A client that never finishes its request's head


def wait_for_close(connection: socket.socket) -> bytes:
    """What the server sends before closing; fails if it keeps the connection past the timeout and a margin."""
    connection.settimeout(HEADER_TIMEOUT_S + 20)
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def read_response(connection: socket.socket) -> bytes:
    """One whole answer (head and a Content-Length body), however the server split it into packets."""
    connection.settimeout(30)
    received = b""
    while b"\r\n\r\n" not in received:
        received += connection.recv(65536)
    head, body = received.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
    while len(body) < length:
        body += connection.recv(65536)
    return head + b"\r\n\r\n" + body


def test_a_connection_that_never_finishes_its_head_is_closed(server):
    with socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1]))) as connection:
        connection.sendall(PARTIAL_HEAD)
        assert wait_for_close(connection) == b""


def test_a_kept_alive_connection_that_never_finishes_its_next_head_is_closed(server):
    with socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1]))) as connection:
        connection.sendall(PARTIAL_HEAD + b"\r\n")
        assert read_response(connection).startswith(b"HTTP/1.1 200")
        time.sleep(1)
        connection.sendall(PARTIAL_HEAD)  # keeps uvicorn's own keep-alive timer off
        assert wait_for_close(connection) == b""

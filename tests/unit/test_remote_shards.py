"""Remote shards against real servers on 127.0.0.1: an HTTP server with Range support and
injected faults, and moto's standalone S3 server; plus ``pipe:`` commands.

A read that a retry recovers must give exactly the stream of local files (same samples, same
order, same pixels); retries are counted; exhausted retries skip the rest of the piece with a
count and a warning naming the URL, and the batch count per rank stays exact.
"""

from __future__ import annotations

import http.server
import logging
import os
import re
import socket
import struct
import threading
import time

import pytest
import torch

from _shardutil import caption_for, write_test_shards
from mmpretrain.data import remote as remote_mod
from mmpretrain.data import shardio
from mmpretrain.data.config import DataConfig
from mmpretrain.data.loader import ShardLoader
from mmpretrain.data.tokenizer import train_tokenizer

NUM_SHARDS, PER_SHARD = 4, 12  # 48 samples, 6 global batches of 8
pytestmark = pytest.mark.timeout(120)  # a hang fails here, not at the suite's 15-minute limit


class FaultyHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.root`` with ``Range: bytes=A-`` support. ``server.faults[name]`` is a list
    of actions consumed one per GET of that file: ``("503",)``, ``("drop", n)`` (send the headers
    of the full body, then ``n`` bytes, then reset the connection), ``("truncate", n)`` (the same,
    closed cleanly), ``("slow", seconds)`` (wait before answering)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def do_HEAD(self):  # what s3fs asks first (the object's size); no faults
        path = os.path.join(self.server.root, self.path.lstrip("/").split("?")[0])
        if not os.path.isfile(path):
            self._reply(404, b"")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(os.path.getsize(path)))
        self.send_header("ETag", '"v1"')
        self.send_header("Last-Modified", "Tue, 01 Dec 2026 00:00:00 GMT")
        self.end_headers()

    def do_GET(self):
        srv = self.server
        name = self.path.lstrip("/").split("?")[0]
        rng = self.headers.get("Range")
        with srv.lock:
            srv.log.append((name, rng))
            actions = srv.faults.get(name)
            action = actions.pop(0) if actions else None
        if action and action[0] == "slow":
            time.sleep(action[1])
        path = os.path.join(srv.root, name)
        if not os.path.isfile(path):
            self._reply(404, b"not found")
            return
        if action and action[0] == "503":
            self._reply(503, b"busy")
            return
        data = open(path, "rb").read()
        start = 0
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)  # s3fs asks for bytes=A-B
            start, stop = int(m.group(1)), int(m.group(2) or len(data) - 1) + 1
            data = data[:stop]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{os.path.getsize(path)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"v1"')
        self.end_headers()
        if action and action[0] in ("drop", "truncate"):
            self.wfile.write(body[:action[1]])
            self.wfile.flush()
            if action[0] == "drop":  # RST instead of FIN, once the client has had the bytes
                time.sleep(0.1)
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.shutdown(socket.SHUT_RDWR) if action[0] == "truncate" else None
            self.connection.close()
            self.close_connection = True
            return
        self.wfile.write(body)

    def _reply(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class FaultyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root):
        super().__init__(("127.0.0.1", 0), FaultyHandler)
        self.root, self.faults, self.log, self.lock = root, {}, [], threading.Lock()

    def handle_error(self, request, client_address):  # a client that gave up (timeouts): quiet
        pass

    def url(self, name=""):
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("remote_shards"))
    write_test_shards(d, NUM_SHARDS, PER_SHARD)  # with manifest.json
    return d


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer([caption_for(i) for i in range(100)], str(tmp_path_factory.mktemp("tok")), 120)


@pytest.fixture()
def server(shard_dir):
    srv = FaultyServer(shard_dir)
    t = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    t.start()
    shardio._MANIFEST_CACHE.clear()
    remote_mod._last_warning.clear()
    yield srv
    srv.shutdown()
    srv.server_close()


def cfg_for(shards, **kw):
    base = dict(train_shards=[shards] if isinstance(shards, str) else shards, global_batch_size=8, num_workers=0,
                image_size=12, shuffle_buffer=8, max_length=12, remote_retries=3, remote_backoff_s=0.01,
                remote_timeout_s=2.0)
    base.update(kw)
    return DataConfig(**base)


def epoch(cfg, tok, rank=0, world=1):
    ld = ShardLoader(cfg, tok, rank=rank, world_size=world, seed=7)
    return ld, list(ld)


def same_stream(a, b):
    assert [x["keys"] for x in a] == [y["keys"] for y in b]
    assert all(torch.equal(x["pixels"], y["pixels"]) and torch.equal(x["input_ids"], y["input_ids"])
               for x, y in zip(a, b))


PATTERN = "train-{000000..%06d}.tar" % (NUM_SHARDS - 1)


@pytest.fixture(scope="module")
def local_ref(shard_dir, tok):
    return {w: epoch(cfg_for(os.path.join(shard_dir, PATTERN), num_workers=w), tok)[1] for w in (0, 2)}


def test_http_and_pipe_streams_equal_local(server, shard_dir, tok, local_ref):
    ld, got = epoch(cfg_for(server.url(PATTERN), num_workers=2), tok)
    assert len(got) == 6
    same_stream(got, local_ref[2])
    assert ld.remote_retries == 0 and ld.skipped == {}
    # the counts came from the served manifest: one request for it, none to count the shards
    assert [n for n, _ in server.log].count("manifest.json") == 1
    pipes = [f"pipe:cat {os.path.join(shard_dir, f'train-{i:06d}.tar')}" for i in range(NUM_SHARDS)]
    same_stream(epoch(cfg_for(pipes), tok)[1], local_ref[0])


@pytest.mark.parametrize("fault", ["drop", "truncate"])
def test_a_recovered_mid_shard_failure_gives_exactly_the_local_stream(server, tok, local_ref, fault):
    server.faults["train-000001.tar"] = [(fault, 5000)]
    ld, got = epoch(cfg_for(server.url(PATTERN)), tok)
    same_stream(got, local_ref[0])
    assert ld.remote_retries == 1 and ld.skipped == {}
    # the retry asked for the rest only, from the byte offset reached (after a reset, bytes that
    # arrived but were not read yet are lost: the offset may be lower, 0 under heavy load)
    gets = [r for n, r in server.log if n == "train-000001.tar"]
    assert len(gets) == 2 and gets[0] is None, gets
    if fault == "truncate":
        assert gets[1] == "bytes=5000-", gets
    else:
        assert gets[1] is None or 0 < int(gets[1][len("bytes="):-1]) <= 5000, gets


def test_503_twice_then_ok_counts_two_retries(server, tok, local_ref):
    server.faults["train-000002.tar"] = [("503",), ("503",)]
    ld, got = epoch(cfg_for(server.url(PATTERN), num_workers=2), tok)
    same_stream(got, local_ref[2])
    assert ld.remote_retries == 2 and ld.skipped == {}
    assert ld.state_dict()["remote_retries"] == 2


def test_exhausted_retries_skip_the_piece_with_a_warning_and_a_count(server, tok, caplog):
    """Every read of one shard breaks right after the headers: after its retries, the rest of it is
    skipped and counted; both ranks still get the same, planned number of batches (refill)."""
    name = "train-000003.tar"
    server.faults[name] = [("drop", 0)] * 100
    cfg = cfg_for(server.url(PATTERN), remote_retries=2)
    with caplog.at_level(logging.WARNING, logger="mmpretrain.data"):
        results = [epoch(cfg, tok, rank=r, world=2) for r in range(2)]
    counts = [len(b) for _, b in results]
    assert counts == [results[0][0].batches_per_epoch] * 2 == [6, 6]
    keys = [k for _, bs in results for b in bs for k in b["keys"]]
    assert not {f"{n:09d}" for n in range(3 * PER_SHARD, 4 * PER_SHARD)} & set(keys)  # the failing shard's
    skipped = sum(ld.skipped.get("remote_read_failed", 0) for ld, _ in results)
    assert skipped >= 1
    assert sum(ld.refilled for ld, _ in results) > 0
    # one rank read the failing shard's pieces: 3 attempts per read (1 + 2 retries)
    assert sum(ld.remote_retries for ld, _ in results) >= 2
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert server.url(name) in text and "after 3 attempts" in text, text


def test_a_stalled_server_times_out_instead_of_hanging(server, tok, caplog):
    name = "train-000000.tar"
    server.faults[name] = [("slow", 6.0)] * 2  # without the timeout one request alone takes 6 s
    cfg = cfg_for(server.url(PATTERN), remote_retries=1, remote_timeout_s=0.3)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="mmpretrain.data"):
        ld, got = epoch(cfg, tok)
    assert time.monotonic() - t0 < 5.0  # 2 attempts x 0.3 s, and the epoch (slack for a loaded machine)
    assert len(got) == ld.batches_per_epoch == 6
    assert ld.skipped == {"remote_read_failed": 1} and ld.remote_retries == 1
    assert server.url(name) in caplog.text and "TimeoutError" in caplog.text


def test_counts_without_a_manifest_and_the_num_samples_hint(server, shard_dir, tok, tmp_path, caplog):
    """No manifest: counting reads every shard in full (warned); data.num_samples plans without
    any request."""
    os.rename(os.path.join(shard_dir, "manifest.json"), str(tmp_path / "m.json"))
    try:
        with caplog.at_level(logging.WARNING, logger="mmpretrain.data"):
            ld = ShardLoader(cfg_for(server.url(PATTERN)), tok, rank=0, world_size=1, seed=7)
        assert ld.source_counts == [[PER_SHARD] * NUM_SHARDS]
        assert "reads each one in full" in caplog.text and "data.num_samples" in caplog.text
        assert sum(n.endswith(".tar") for n, _ in server.log) == NUM_SHARDS
        server.log.clear()
        shardio._MANIFEST_CACHE.clear()
        ld = ShardLoader(cfg_for(server.url(PATTERN), num_samples=46), tok, rank=0, world_size=1, seed=7)
        assert ld.source_counts == [[12, 12, 11, 11]] and ld.batches_per_epoch == 5
        assert not any(n.endswith(".tar") for n, _ in server.log)  # only manifest.json was asked for
        assert len(list(ld)) == 5
    finally:
        os.rename(str(tmp_path / "m.json"), os.path.join(shard_dir, "manifest.json"))


def test_exact_resume_on_http_shards_two_ranks_two_workers(server, tok):
    """Stopped after 3 batches and resumed from the (JSON) state on each of 2 ranks x 2 workers,
    with a connection cut mid-shard in every shard during the resumed read: the same batches as
    an uninterrupted run."""
    import json

    cfg = cfg_for(server.url(PATTERN), num_workers=2, global_batch_size=4)
    for rank in range(2):
        full = list(ShardLoader(cfg, tok, rank=rank, world_size=2, seed=7))
        assert len(full) == 12
        first = ShardLoader(cfg, tok, rank=rank, world_size=2, seed=7)
        it = iter(first)
        head = [next(it) for _ in range(3)]
        state = json.loads(json.dumps(first.state_dict()))
        it.close()
        for i in range(NUM_SHARDS):
            server.faults[f"train-{i:06d}.tar"] = [("truncate", 3000)]
        resumed = ShardLoader(cfg, tok, rank=rank, world_size=2, seed=7)
        resumed.load_state_dict(state)
        rest = list(resumed)
        server.faults.clear()
        same_stream(head + rest, full)
        assert resumed.remote_retries >= state["remote_retries"] + 1 and resumed.skipped == {}


def test_a_missing_remote_shard_is_skipped_without_retries(server, tok, caplog):
    f = remote_mod.RemoteFile(server.url("nope.tar"), remote_mod.RemoteOptions(retries=3, backoff_s=0.01))
    with caplog.at_level(logging.WARNING, logger="mmpretrain.data"), \
            pytest.raises(remote_mod.NotFound, match="HTTP 404"):
        f.read()
    assert f.stats.retries == 0 and server.url("nope.tar") in caplog.text
    assert remote_mod.read_remote(server.url("nope.json")) is None
    got = list(shardio.iter_shard_samples(server.url("nope.tar")))
    assert [s["__bad__"] for _, s in got] == ["remote_read_failed"]


def test_s3_faults_are_retried_counted_and_exact(shard_dir, tok, local_ref, tmp_path, monkeypatch):
    """s3:// through s3fs, with the fault-injecting server as the S3 endpoint (path-style
    ``/bucket/key``): a 503 and a cut body are retried by us (s3fs's and botocore's own retries
    are off), counted, and the stream is exactly the local one."""
    s3fs = pytest.importorskip("s3fs")
    os.symlink(shard_dir, str(tmp_path / "bkt"))
    srv = FaultyServer(str(tmp_path))
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": srv.url().rstrip("/")}.items():
        monkeypatch.setenv(k, v)
    remote_mod._FS_CACHE.clear()
    s3fs.S3FileSystem.clear_instance_cache()
    shardio._MANIFEST_CACHE.clear()
    try:
        srv.faults["bkt/train-000002.tar"] = [("503",), ("truncate", 3000)]
        ld, got = epoch(cfg_for(f"s3://bkt/{PATTERN}"), tok)
        same_stream(got, local_ref[0])
        assert ld.remote_retries == 2 and ld.skipped == {}
        assert [n for n, _ in srv.log].count("bkt/train-000002.tar") == 3
    finally:
        srv.shutdown()
        srv.server_close()
        remote_mod._FS_CACHE.clear()
        s3fs.S3FileSystem.clear_instance_cache()
        shardio._MANIFEST_CACHE.clear()


@pytest.fixture(scope="module")
def s3_bucket(shard_dir):
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        s3.create_bucket(Bucket="shards")
        for name in sorted(os.listdir(shard_dir)):
            s3.upload_file(os.path.join(shard_dir, name), "shards", f"train/{name}")
        yield "s3://shards/train"
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        srv.stop()


def test_s3_stream_equals_local(s3_bucket, tok, local_ref):
    shardio._MANIFEST_CACHE.clear()
    remote_mod._FS_CACHE.clear()
    ld, got = epoch(cfg_for(f"{s3_bucket}/{PATTERN}", num_workers=2), tok)
    same_stream(got, local_ref[2])
    assert ld.source_counts == [[PER_SHARD] * NUM_SHARDS]  # from the manifest in the bucket
    assert ld.remote_retries == 0 and ld.skipped == {}
    assert shardio.expand_sources(f"{s3_bucket}/train-*.tar") == [f"{s3_bucket}/train-{i:06d}.tar"
                                                                  for i in range(NUM_SHARDS)]


def test_training_from_http_shards_logs_the_retries_and_keeps_the_losses(server, tmp_path):
    """The trainer on http shards whose every shard answers 503 twice first: metrics.jsonl counts
    2 remote retries per shard opened and the losses equal those of the same run on local files."""
    from _trainutil import losses, make_config, make_shards, metrics, run_train

    shards = make_shards(tmp_path)
    server.root = str(shards)
    names = sorted(p.name for p in shards.glob("train-*.tar"))
    pattern = f"train-{{000000..{len(names) - 1:06d}}}.tar"
    for name in names:
        server.faults[name] = [("503",), ("503",)]
    common = ["train.max_steps=2", "train.log_every=2", "train.save_every=2", "data.remote_backoff_s=0.01"]
    assert run_train(make_config(tmp_path), tmp_path / "local", *common) == 0
    assert run_train(make_config(tmp_path), tmp_path / "http", f"data.train_shards=[{server.url(pattern)}]",
                     *common) == 0
    assert losses(tmp_path / "http") == losses(tmp_path / "local")
    opened = {name for name, _ in server.log if name in names}
    assert opened and metrics(tmp_path / "http")[2]["remote_retries"] == 2 * len(opened)
    assert metrics(tmp_path / "local")[2]["remote_retries"] == 0

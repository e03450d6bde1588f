"""`POST /checkpoint` on a server with `--mirror-peer`: mirroring pauses for the
checkpoint (a frozen primary must not be watched, or failed over from) and resumes
after restore; the standby stays up (`standby: keep`) or is stopped and replaced
(`standby: stop`), and catches up from the restored prefix cache. Real primary and
standby engines, real NIXL, real HTTP."""

from __future__ import annotations

import pytest

from tests.entrypoints.serve.test_checkpoint import (
    ADMIN_KEY,
    ARGS,
    AUTH,
    cached,
    checkpoint,
    complete,
    restore,
    status,
    tokens,
)
from tests.utils import ON_CUDA, RemoteServer, child_env
from tests.v1.engine.test_mirror_supervisor import (
    _running,
    assert_standby_holds_everything,
    wait_mirror,
)

pytestmark = pytest.mark.slow

MIRROR = (["--mirror-peer", "cuda:0", "--mirror-allow-same-device"] if ON_CUDA
          else ["--mirror-peer", "cpu"])
# The driver does not restore a process that mapped the standby's memory (CUDA IPC):
# on CUDA a mirrored server's checkpoint stops at the offload (release_gpu=true: 409).
KEEP_GPU = {"release_gpu": False} if ON_CUDA else {}


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("checkpoint-mirror") / "serve.log"
    env = child_env(VLLM_HA_ADMIN_KEY=ADMIN_KEY, VLLM_SERVER_DEV_MODE="1")
    with RemoteServer(str(tiny_model), ARGS + MIRROR, log, env=env) as s:
        wait_mirror(s)
        yield s


@pytest.fixture(autouse=True)
def serving_after(server):
    yield
    if status(server)["state"] == "checkpointed":
        restore(server)


def test_checkpoint_pauses_the_mirror_and_restore_resumes_it(server):
    before = wait_mirror(server)
    ref = complete(server)
    if ON_CUDA:
        r = server.post("/checkpoint", {}, headers=AUTH)
        assert r.status_code == 409 and "release_gpu=false" in r.text, r.text
    st = checkpoint(server, **KEEP_GPU)
    assert st["state"] == "checkpointed" and st["mirror"] == "paused", st
    assert "mirror_pause" in st["phases_s"]
    m = server.get("/mirror").json()
    assert m["state"] == "paused" and m["standby"]["pid"] == before["standby"]["pid"]
    assert _running(before["standby"]["pid"])  # standby: keep

    restore(server)
    out = complete(server)
    assert tokens(out) == tokens(ref) and cached(out) > 0
    after = wait_mirror(server)  # the same standby, caught up from the prefix cache
    assert after["standby"]["pid"] == before["standby"]["pid"]
    assert_standby_holds_everything(
        server, [out["choices"][0]["prompt_token_ids"] + tokens(out)])


def test_checkpoint_can_stop_the_standby_and_restore_starts_a_new_one(server):
    complete(server)  # something cached for the new standby to catch up
    before = wait_mirror(server)
    st = checkpoint(server, standby="stop", **KEEP_GPU)
    assert st["mirror"] == "paused"
    assert not _running(before["standby"]["pid"])
    restore(server)
    after = wait_mirror(server)
    assert after["standby"]["pid"] != before["standby"]["pid"]
    verify = server.post("/mirror/verify", {}).json()
    assert verify["checked"] > 0 and not verify["missing"] and not verify["mismatched"]


def test_an_operator_pause_outlives_the_checkpoint(server):
    wait_mirror(server)
    assert server.post("/mirror/pause", {}).status_code == 401  # the admin key
    assert server.post("/mirror/pause", {}, headers=AUTH).status_code == 200
    checkpoint(server, **KEEP_GPU)
    restore(server)
    assert server.get("/mirror").json()["state"] == "paused"
    assert server.post("/mirror/resume", {}, headers=AUTH).status_code == 200
    wait_mirror(server)


def test_bad_standby_option_is_refused(server):
    r = server.post("/checkpoint", {"standby": "drop"}, headers=AUTH)
    assert r.status_code == 400 and "standby" in r.text
    assert status(server)["state"] == "serving"
    assert server.get("/mirror").json()["state"] == "in_sync"


def test_a_mirrored_server_refuses_to_load_a_snapshot(server):
    """Its standby would keep the old prefix cache: refused before anything changes."""
    r = server.post("/snapshot/load", {"name": "any"}, headers=AUTH)
    assert r.status_code == 409 and "--mirror-peer" in r.text, r.text
    assert status(server)["state"] == "serving"

import sys, json
sys.path.insert(0, ".")
from pathlib import Path
from tests.entrypoints.serve import test_checkpoint as T
from tests.utils import RemoteServer, child_env, make_tiny_model
import os
out = Path(os.environ["OUT"])
m = out / "m"; make_tiny_model(m)
with RemoteServer(str(m), T.ARGS + ["--snapshot-root", str(out / "root")], out / "exp.log", env=child_env()) as s:
    T.complete(s)
    for body in ({"snapshot": "z", "codec": "zlib"}, "snap", {"codec": "ans"}):
        if body == "snap":
            r = s.post("/snapshot", {"name": "p"}, timeout=600); print("snapshot", r.status_code, r.text[:100], flush=True)
            continue
        r = s.post("/checkpoint", body, timeout=600); print(body, r.status_code, r.text[:150], flush=True)
        r = s.post("/restore", {}, timeout=600); print(" restore", r.status_code, r.text[:200], flush=True)
        if r.status_code != 200:
            r = s.post("/restore", {}, timeout=600); print(" restore again", r.status_code, r.text[:200], flush=True)

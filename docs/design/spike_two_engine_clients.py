# Design spike for docs/design/failover.md (issue 4): can the API server hold two engine clients?
# Run: python docs/design/spike_two_engine_clients.py MODEL_DIR   (CPU build: tiny model from scripts/make_tiny_model.py)
import asyncio
import copy
import os
import sys
import time

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.v1.engine.core_client import EngineCoreClient
from vllm.v1.executor import Executor

from vllm import SamplingParams
from vllm.v1.engine import EngineCoreRequest


async def main(model):
    args = AsyncEngineArgs(model=model, enforce_eager=True, dtype="float32", max_model_len=256, block_size=16)
    cfg = args.create_engine_config()
    ex = Executor.get_class(cfg)
    t0 = time.time()
    a = EngineCoreClient.make_async_mp_client(cfg, ex, log_stats=False)
    print("client A up", round(time.time()-t0,1), flush=True)
    cfg2 = copy.deepcopy(cfg)
    t0 = time.time()
    b = EngineCoreClient.make_async_mp_client(cfg2, ex, log_stats=False)
    print("client B up", round(time.time()-t0,1), flush=True)
    def req(rid):
        sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        return EngineCoreRequest(request_id=rid, prompt_token_ids=list(range(10, 40)), mm_features=None,
                                 sampling_params=sp, pooling_params=None, arrival_time=time.time(),
                                 lora_request=None, cache_salt=None, data_parallel_rank=None)
    res = {}
    for name, c in (("A", a), ("B", b)):
        await c.add_request_async(req("r" + name))
        toks = []
        while True:
            outs = await c.get_output_async()
            for o in outs.outputs:
                toks += o.new_token_ids
                if o.finish_reason is not None:
                    res[name] = toks
            if name in res:
                break
        print(name, res[name], flush=True)
    print("SAME", res["A"] == res["B"])
    # Kill A's engine; B must keep working.
    import signal
    pa = a.resources.engine_manager.processes[0].pid
    os.kill(pa, signal.SIGKILL)
    t0 = time.time()
    try:
        await asyncio.wait_for(a.get_output_async(), 10)
    except Exception as e:
        print("A dead after", round(time.time()-t0, 3), "s:", type(e).__name__)
    await b.add_request_async(req("rB2"))
    toks = []
    while True:
        outs = await b.get_output_async()
        done = False
        for o in outs.outputs:
            toks += o.new_token_ids
            done = done or o.finish_reason is not None
        if done:
            break
    print("B after A died:", toks == res["B"])
    a.shutdown()
    b.shutdown()

if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))

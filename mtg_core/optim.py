"""bitsandbytes' 8-bit AdamW (paged on CUDA, the seed's recipe) with one host sync per step instead of one per tensor.

bitsandbytes' Optimizer8bit.step (bitsandbytes/optim/optimizer.py:306-341, 0.50) calls `sync_gpu(p)`, a
torch.cuda.synchronize() (bitsandbytes/utils.py:204), after every parameter's update: Mixtral's 1,792 LoRA
tensors at r16 are 1,792 host syncs per optimizer step, each draining the GPU. None is needed between
parameters: the paged state is prefetched with cudaMemPrefetchAsync on stream 0 (csrc/pythonInterface.cpp,
`cprefetch`) and the update kernels are launched on stream 0 too (bitsandbytes/backends/cuda/ops.py:1183, no
stream passed), so each update already runs after its prefetch and after the gradients the default stream
made. What stays is bitsandbytes' own sync at the end of a paged step (optimizer.py:336-339, "all paged
operations are asynchronous"). On another current stream the updates (stream 0) would not be ordered after
its work, so there the step falls back to bitsandbytes' per-parameter syncs. On the CPU `sync_gpu` does
nothing; the step calls it once all the same, which is what the tests count.
"""

from __future__ import annotations


def one_sync_per_step(optimizer_cls):
    """`optimizer_cls` (a bitsandbytes Optimizer8bit subclass) whose step syncs the host once, at its end."""
    import bitsandbytes.optim.optimizer as bnb_optimizer
    import torch

    class OneSyncPerStep(optimizer_cls):
        @torch.no_grad()
        def step(self, closure=None):
            first = next((p for group in self.param_groups for p in group["params"] if p.grad is not None), None)
            if first is None or first.is_cuda and torch.cuda.current_stream(first.device) != torch.cuda.default_stream(first.device):
                return super().step(closure)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:  # what Optimizer8bit.step does, minus sync_gpu after each parameter
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if len(self.state[p]) == 0:
                        self.init_state(group, p, gindex, pindex)
                    self.prefetch_state(p)
                    self.update_step(group, p, gindex, pindex)
            bnb_optimizer.sync_gpu(first)  # looked up at call time, as bitsandbytes' step does
            return loss

    OneSyncPerStep.__name__ = OneSyncPerStep.__qualname__ = f"{optimizer_cls.__name__}OneSync"
    return OneSyncPerStep

"""Full fine-tuned models in a scan: θ₀ + ΔW' computed by the op on the device and written into the loaded base.

The loaded model is BASE. The dense engine's plan says which tensors merge; per point each is read again (the page
cache serves it) and merged straight into the model's tensor (`apply_method_into`) in one `Workspace` kept for the
scan; tensors only the expert has are copied in once."""

from collections.abc import Sequence

import torch

from extsub_kernels._tensors import all_finite, compute_dtype
from extsub_kernels.engine.conv1d import transposed_weights
from extsub_kernels.engine.methods import apply_method, apply_method_into, method_workspace
from extsub_kernels.engine.plan import TensorJob, plan_tensors
from extsub_kernels.errors import InputError
from extsub_kernels.io import CheckpointReader, ResolvedInput
from extsub_kernels.lambda_scan.installers.base import Installer, too_large


class FullModelInstaller(Installer):
    """Full models installed into the loaded base tensor by tensor; `inputs`: (role, input), BASE last; the op runs
    on `device` (the model's)."""

    kind = "full models"

    def __init__(self, inputs: Sequence[tuple[str, ResolvedInput]], device: torch.device):
        self.device = device
        self.readers = [CheckpointReader(inp.files, label=role) for role, inp in inputs]
        try:
            transposed = transposed_weights(inputs[0][1].config())
            self.jobs, _ = plan_tensors(self.readers, n_anti=len(inputs) - 2, has_base=True, transposed=transposed)
        except BaseException:
            self.close()
            raise

    def attach(self, model: torch.nn.Module, base_name: str) -> None:
        """Match every planned tensor to the model's own; the expert's unmerged tensors are copied in now."""
        self.model = model
        try:
            tensors = model.state_dict(keep_vars=True)
            self.targets: list[tuple[TensorJob, torch.Tensor]] = []
            for job in self.jobs:
                target = _model_tensor(tensors, job.name, merged=job.merged)
                if target is None:
                    continue
                if tuple(target.shape) != job.shape:
                    raise InputError(
                        f"tensor {job.name!r} is {list(job.shape)} in EXPERT but {list(target.shape)} in the loaded "
                        f"BASE model {base_name}; are they the same architecture?"
                    )
                if job.merged:
                    self.targets.append((job, target))
                else:  # the expert's own (a key no anti-expert has): the same at every λ
                    with torch.no_grad():
                        target.copy_(self.readers[job.source].read(job.name))
        except BaseException:
            self.close()
            raise
        # the merge's working space for every point: slots of the widest compute dtype the merged tensors need
        dtypes = [self.readers[i].info(job.name).dtype for job, _ in self.targets for i in job.inputs()]
        largest = max((target.numel() for _, target in self.targets), default=1)
        n_anti = max((len(job.antis) for job, _ in self.targets), default=1)
        itemsize = compute_dtype(*dtypes).itemsize if dtypes else 4
        self.workspace = method_workspace(n_anti, itemsize, self.device, largest)

    def install(self, method: str, lam: float) -> None:
        """θ₀ + ΔW' at (method, λ) into every merged tensor of the model, in the model's dtype."""
        with torch.no_grad():
            for job, target in self.targets:
                moved = [self.readers[i].read(job.name).to(self.device) for i in job.inputs()]
                plus, minus, theta0 = moved[0], moved[1:-1], moved[-1]
                lams = [lam] * len(minus)
                kwargs = dict(method=method, base=theta0, transposed=job.transposed)
                if target.is_contiguous():
                    apply_method_into(target, plus, minus, lams, workspace=self.workspace, **kwargs)
                else:  # a view into another tensor's storage: merged apart, then copied in
                    target.copy_(apply_method(plus, minus, lams, out_dtype=target.dtype, **kwargs))
                if not all_finite(target):  # inputs were finite (the plan read them): λ is too large for the dtype
                    raise too_large(f"tensor {job.name}", method, lam, target.dtype)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


def _model_tensor(tensors: dict[str, torch.Tensor], key: str, *, merged: bool) -> torch.Tensor | None:
    """The model's tensor for checkpoint key `key`: same name, or the one name equal up to a leading prefix."""
    if key in tensors:
        return tensors[key]
    found = [k for k in tensors if k.endswith("." + key) or key.endswith("." + k)]
    if len(found) == 1:
        return tensors[found[0]]
    if not merged:
        return None
    if found:
        raise InputError(f"tensor {key!r} could be any of {', '.join(found[:4])} in the loaded BASE model")
    raise InputError(
        f"tensor {key!r} of EXPERT has no counterpart in the loaded BASE model; are they the same architecture?"
    )

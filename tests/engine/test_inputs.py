"""Samples and outputs as the training stacks have them (issue 18, pkfast/engine/inputs.py): X as a mapping of tensors
(keyword arguments) or a tuple (positional), split per sample; outputs that are dicts/ModelOutputs/tuples reduced
by the default rule or ``output_fn``. Each result equals the same computation on a twin model that takes one
packed tensor and returns a tensor (same parameter names, so the same trajectory) — float64 to 1e-10."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import pkfast
from pkfast.reference import gram_reference
from tests._util import RTOL, rel_err
from tests.models import random_trajectory

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[2]


class KW(nn.Module):
    """Token ids and a float feature vector, returning a dict (as Hugging Face models return ModelOutputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Embedding(11, 4)
        self.l = nn.Linear(4 + 3, 2)

    def forward(self, input_ids, extra, attention_mask=None):
        h = self.e(input_ids)
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        h = h.mean(1)
        return {"logits": self.l(torch.cat([h, extra], -1)), "hidden": torch.tanh(h)}


class Flat(KW):
    """The twin: one packed float64 tensor [ids (3) | extra (3) | mask (3)] in, one tensor out."""

    key = "logits"

    def forward(self, x):
        ids, extra, mask = x[:, :3].long(), x[:, 3:6], x[:, 6:9].long()
        return KW.forward(self, ids, extra, mask)[self.key]


def _setup(n: int = 6, m: int = 4):
    torch.manual_seed(0)
    net = KW().to(F64)
    traj = random_trajectory(net, steps=2, scale=0.1)
    twin = Flat().to(F64)
    twin.load_state_dict(net.state_dict())
    g = torch.Generator().manual_seed(1)

    def data(k):
        ids = torch.randint(0, 11, (k, 3), generator=g)
        mask = (torch.rand(k, 3, generator=g) > 0.3).long()
        extra = torch.randn(k, 3, generator=g, dtype=F64)
        return {"input_ids": ids, "extra": extra, "attention_mask": mask}, \
            torch.cat([ids.to(F64), extra, mask.to(F64)], dim=1)

    return net, twin, traj, data(n), data(m)


@pytest.mark.parametrize("method", ["auto", "factorized", "materialized", "jacobian"])
def test_mapping_inputs_and_dict_outputs_match_the_packed_twin(method):
    net, twin, traj, (X, Xp), (X2, X2p) = _setup()
    ref = gram_reference(twin, traj, Xp, X2p, outputs="full")
    K = pkfast.gram(net, traj, X, X2, outputs="full", dtype=F64, method=method, progress=False)
    assert rel_err(K, ref) <= RTOL[F64]
    # output_fn chooses another output; a tuple of the fields is passed positionally
    twin.key = "hidden"
    ref_h = gram_reference(twin, traj, Xp)
    Kh = pkfast.gram(net, traj, X, output_fn=lambda o: o["hidden"], dtype=F64, method=method, progress=False)
    assert rel_err(Kh, ref_h) <= RTOL[F64]
    Kt = pkfast.gram(net, traj, (X["input_ids"], X["extra"], X["attention_mask"]), output_fn=lambda o: o["hidden"],
                     dtype=F64, method=method, progress=False)
    assert rel_err(Kt, ref_h) <= RTOL[F64]


def test_plan_sketch_and_kernel_machine_take_mappings(tmp_path):
    net, twin, traj, (X, Xp), (X2, X2p) = _setup()
    p = pkfast.plan(net, traj, X)
    assert [L.kind for L in p.layers] == ["embedding", "linear"]
    f, f_twin = (pkfast.sketch(m, traj, x, k=64, seed=3, dtype=F64, progress=False) for m, x in ((net, X), (twin, Xp)))
    assert rel_err(f.gram(), f_twin.gram()) <= RTOL[F64]
    # the kernel machine: record a run on the mapping, rebuild it, and agree with the packed twin
    ys = torch.randint(0, 2, (6,))
    opt, lossf = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), nn.CrossEntropyLoss()
    with pkfast.TrajectoryRecorder(net, opt, tmp_path / "t", loss=lossf, targets=ys) as rec:
        for s in range(3):
            idx = torch.tensor([s, s + 3])
            opt.zero_grad()
            lossf(net(**{k: v[idx] for k, v in X.items()})["logits"], ys[idx]).backward()
            opt.step()
            rec.step(batch_indices=idx)
    t = pkfast.Trajectory.load(tmp_path / "t")
    km = pkfast.KernelMachine(net, t, X, progress=False)
    km_twin = pkfast.KernelMachine(twin, t, Xp, progress=False)
    assert rel_err(km.contributions(X2), km_twin.contributions(X2p)) <= RTOL[F64]
    with torch.no_grad():
        f_net = net(**X2)["logits"]
    assert float((km.predict(X2) - f_net).abs().max()) < 1e-6  # the network itself, to quadrature precision
    one = {k: v[:1] for k, v in X2.items()}
    e, e_twin = km.explain(one, k=2), km_twin.explain(X2p[:1], k=2)
    assert torch.equal(e.proponents, e_twin.proponents)


def test_structured_input_errors_say_what_was_expected():
    net, twin, traj, (X, Xp), (X2, X2p) = _setup()
    bad = dict(X, extra=X["extra"][:4])
    with pytest.raises(ValueError, match=r"X\['extra'\] has 4 samples while X\['input_ids'\] has 6"):
        pkfast.gram(net, traj, bad, progress=False)
    with pytest.raises(TypeError, match=r"X2 is a Tensor while the first sample set is a mapping of 3 field"):
        pkfast.gram(net, traj, X, X2p, progress=False)
    with pytest.raises(ValueError, match=r"X2 is a mapping of 2 field.*expected the first sample set's mapping of 3"):
        pkfast.gram(net, traj, X, {k: X2[k] for k in ("input_ids", "extra")}, progress=False)
    with pytest.raises(TypeError, match=r"output_fn must be a function"):
        pkfast.gram(net, traj, X, output_fn="logits", progress=False)
    with pytest.raises(ValueError, match=r"holds integers up to .* exact for integers below 2\^24"):
        pkfast.gram(net, traj, dict(X, input_ids=X["input_ids"] + 2 ** 24), progress=False)

    class Two(KW):
        def forward(self, input_ids, extra, attention_mask=None):
            o = KW.forward(self, input_ids, extra, attention_mask)
            return {"a": o["logits"], "b": o["hidden"]}

    two = Two().to(F64)
    with pytest.raises((TypeError, ValueError),
                       match=r"returned a dict with keys \[.a., .b.\] and no .logits.; pass output_fn="):
        pkfast.gram(two, random_trajectory(two, steps=1), X, progress=False)
    assert pkfast.gram(two, random_trajectory(two, steps=1), X, output_fn=lambda o: o["b"], progress=False).shape == (6, 6)


def test_cli_reads_an_npz_of_model_arguments(tmp_path):
    net, twin, traj, (X, Xp), _ = _setup()
    traj.save(tmp_path / "traj")
    (tmp_path / "nets.py").write_text("import torch, tests.engine.test_inputs as t\n"
                                      "def make():\n    return t._setup()[0]\n")
    np.savez(tmp_path / "X.npz", **{k: v.numpy() for k, v in X.items()})
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "pkfast", "gram", "--model", "nets:make", "--trajectory",
                        str(tmp_path / "traj"), "--data", str(tmp_path / "X.npz"), "--out", str(tmp_path / "K.npy"),
                        "--dtype", "float64"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    K = pkfast.gram(net, traj, X, dtype=F64, progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "K.npy"), K.numpy(), rtol=1e-12)

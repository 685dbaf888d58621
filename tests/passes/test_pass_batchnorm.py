"""The BatchNorm rewrite pass (``fxdp/passes/batchnorm.py``): replacements, degenerate groups, freeze, instance norm
running statistics, refusals, and training a ResNet-style model (float64)."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from fxdp.capture import Recorder
from fxdp.passes.batchnorm import DPGroupNorm, FrozenBatchNorm
from fxdp.passes.capture import insert_captures
from oracle import assert_grad_samples_match, batch_of_one_grads, quiet_privatize

pytestmark = pytest.mark.usefixtures("f64")
privatize = quiet_privatize


def randomize(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
        for name, b in m.named_buffers():
            if name.endswith("running_mean"):
                b.normal_()
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    return m


class Net(nn.Module):
    """conv/linear -> norm -> ReLU -> head, for inputs of any rank."""

    def __init__(self, norm: nn.Module, C: int, rank: int):
        super().__init__()
        self.rank = rank
        self.pre = nn.Conv1d(3, C, 1) if rank == 3 else nn.Conv2d(3, C, 1) if rank == 4 else \
            nn.Conv3d(3, C, 1) if rank == 5 else nn.Linear(3, C)
        self.norm = norm
        self.head = nn.Linear(C, 2)

    def forward(self, x):
        h = torch.relu(self.norm(self.pre(x)))
        return self.head(h.flatten(2).mean(-1) if self.rank > 2 else h)


def input_for(rank: int, B: int = 4, spatial: int = 3):
    return torch.randn((B, 3) + (spatial,) * (rank - 2))


def reference(model: Net, norm: nn.Module) -> Net:
    """``model`` with its norm replaced by ``norm`` carrying copies of the affine values."""
    ref = copy.deepcopy(model)
    if model.norm.affine:
        with torch.no_grad():
            norm.weight.copy_(model.norm.weight)
            norm.bias.copy_(model.norm.bias)
    ref.norm = norm
    return ref


def check_grads(dp, ref, x, seed=0):
    """dp's per-sample gradients equal ``ref``'s batch-of-one gradients; outputs equal."""
    out = dp(x)
    torch.testing.assert_close(out, ref(x), rtol=0, atol=1e-10)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * w).sum().div(x.shape[0]).backward()
    exp = batch_of_one_grads(ref, [x], lambda o, i: (o * w[i:i + 1]).sum())
    assert_grad_samples_match(dp, exp)


# -- replacements ----------------------------------------------------------------------

BN = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


@pytest.mark.parametrize("rank", [3, 4, 5])
@pytest.mark.parametrize("C", [8, 48])
@pytest.mark.parametrize("affine", [True, False])
def test_groupnorm_default_keeps_affine_parameters(rank, C, affine):
    torch.manual_seed(rank * 100 + C + affine)
    model = randomize(Net(BN[rank](C, affine=affine), C, rank))
    dp = privatize(model)
    G = math.gcd(32, C)
    assert type(dp.norm) is DPGroupNorm and dp.norm.num_groups == G and dp.norm.affine == affine
    if affine:  # the same Parameter objects: an optimizer on the original model updates them
        assert dp.norm.weight is model.norm.weight and dp.norm.bias is model.norm.bias
    assert type(model.norm) is BN[rank]  # the user's model is not modified
    sd = dp.state_dict()
    assert ("norm.weight" in sd) == affine and "norm.running_mean" not in sd
    check_grads(dp, reference(model, nn.GroupNorm(G, C, affine=affine)), input_for(rank))
    (r,) = dp.rewrites
    assert (r.path, r.original, r.replacement, r.reversible) == ("norm", BN[rank].__name__, "DPGroupNorm", False)
    assert r.details["num_groups"] == G and "batch statistics" in r.reason
    assert not r.details["degenerate_inputs"]


@pytest.mark.parametrize("mode, groups", [("instancenorm", lambda C: C), ("layernorm", lambda C: 1),
                                          ("groupnorm", lambda C: math.gcd(4, C))])
def test_modes_and_group_option(mode, groups):
    torch.manual_seed(3)
    C = 12
    model = randomize(Net(nn.BatchNorm2d(C), C, 4))
    opts = {"batchnorm": mode}
    if mode == "groupnorm":
        opts["batchnorm_groups"] = 4
    dp = privatize(model, rewrite_options=opts)
    assert dp.norm.num_groups == groups(C)
    check_grads(dp, reference(model, nn.GroupNorm(groups(C), C)), input_for(4))


def test_sync_batchnorm_and_subclasses_are_replaced():
    class MyBN(nn.BatchNorm2d):
        pass

    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.SyncBatchNorm(8), nn.ReLU(), nn.Conv2d(8, 8, 1), MyBN(8))
    dp = privatize(model)
    assert [(r.path, r.original) for r in dp.rewrites] == [("1", "SyncBatchNorm"), ("4", "MyBN")]
    assert all(isinstance(m, DPGroupNorm) for m in (getattr(dp, "1"), getattr(dp, "4")))


def test_frozen_and_eval_batchnorm_are_still_replaced():
    torch.manual_seed(5)
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8),
                                    nn.Flatten(), nn.Linear(8 * 9, 2)))
    model[1].requires_grad_(False)
    model[3].eval()  # eval on the BatchNorm only: dp.train() would make it mix samples again
    dp = privatize(model)
    assert [r.path for r in dp.rewrites] == ["1", "3"]
    assert all("frozen or in eval mode" in r.reason for r in dp.rewrites)
    x = torch.randn(4, 3, 3, 3)
    out = dp(x)
    x2 = x.clone()
    x2[1:] = torch.randn(3, 3, 3, 3)  # other samples change: sample 0's output does not
    torch.testing.assert_close(dp(x2)[0], out[0], rtol=0, atol=1e-12)
    out.sum().backward()
    assert getattr(model[1].weight, "grad_sample", None) is None and model[3].weight.grad_sample.shape[0] == 4


def test_shared_batchnorm_stays_shared():
    torch.manual_seed(6)
    bn = nn.BatchNorm1d(6)
    model = nn.Sequential(nn.Linear(4, 6), bn, nn.Linear(6, 6), bn)
    dp = privatize(model)
    assert getattr(dp, "1") is getattr(dp, "3") and [r.path for r in dp.rewrites] == ["1", "3"]


# -- degenerate groups ------------------------------------------------------------------

def degenerate_model(C, spatial):
    """pre-layer -> BatchNorm on ``[B, C, *spatial]`` -> head."""
    pre = [nn.Linear(C, C), nn.Conv1d(C, C, 1), nn.Conv2d(C, C, 1)][len(spatial)]
    bn = nn.BatchNorm2d(C) if len(spatial) == 2 else nn.BatchNorm1d(C)
    return randomize(nn.Sequential(pre, bn, nn.Flatten(), nn.Linear(C * math.prod(spatial), 2)))


@pytest.mark.parametrize("C, spatial, mode, per_group", [
    (16, (), "groupnorm", 1),  # BatchNorm1d on [B, C]: GroupNorm(16, 16) would zero every feature
    (64, (), "groupnorm", 2),  # GroupNorm(32, 64) on [B, 64]: +-1 outputs
    (8, (1, 1), "groupnorm", 1),  # after global pooling
    (6, (2,), "instancenorm", 2),
])
def test_degenerate_groups_fall_back_to_layer_norm(C, spatial, mode, per_group):
    torch.manual_seed(C)
    model = degenerate_model(C, spatial)
    x = torch.randn(5, C, *spatial)
    with pytest.warns(UserWarning, match=f"groups of {per_group} value"):
        dp = fxdp.privatize(model, example_inputs=(x,), rewrite_options={"batchnorm": mode})
    (r,) = dp.rewrites
    assert r.details["degenerate_inputs"] == {(C,) + spatial: 1}
    ref = copy.deepcopy(model)
    ref[1] = nn.GroupNorm(1, C)
    ref[1].load_state_dict({"weight": model[1].weight, "bias": model[1].bias})
    if not spatial:  # one group over [B, C] is LayerNorm(C)
        ln = nn.LayerNorm(C)
        ln.load_state_dict({"weight": model[1].weight, "bias": model[1].bias})
        h = torch.randn(5, C)
        torch.testing.assert_close(ln(h), ref[1](h), rtol=0, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per input shape, not again
        check_grads(dp, ref, x)


def test_non_degenerate_groups_are_kept():
    torch.manual_seed(7)
    model = randomize(nn.Sequential(nn.Linear(3, 96), nn.BatchNorm1d(96), nn.Linear(96, 2)))
    x = torch.randn(4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dp = fxdp.privatize(model, example_inputs=(x,))
    ref = copy.deepcopy(model)
    ref[1] = nn.GroupNorm(32, 96)
    ref[1].load_state_dict({"weight": model[1].weight, "bias": model[1].bias})
    check_grads(dp, ref, x)  # 3 values per group


def test_single_value_per_sample_is_refused():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))
    dp = privatize(model)
    with pytest.raises(fxdp.UnsupportedModelError, match="freeze"):
        dp(torch.randn(4, 3))


# -- freeze -------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [2, 3, 4])
@pytest.mark.parametrize("affine", [True, False])
def test_freeze_equals_batchnorm_eval_and_never_updates(rank, affine):
    torch.manual_seed(rank + 10 * affine)
    C = 5
    bn = (nn.BatchNorm1d if rank <= 3 else nn.BatchNorm2d)(C, affine=affine)
    model = randomize(Net(bn, C, rank))
    with pytest.warns(UserWarning, match="only differentially private if those statistics were NOT"):
        dp = fxdp.privatize(model, rewrite_options={"batchnorm": "freeze"})
    assert type(dp.norm) is FrozenBatchNorm
    assert dp.state_dict().keys() == model.state_dict().keys()  # checkpoints load both ways
    assert dp.norm.running_mean is model.norm.running_mean
    stats = [b.clone() for b in model.norm.buffers()]
    ref = copy.deepcopy(model).eval()  # evaluation-mode BatchNorm: the frozen affine map
    x = input_for(rank)
    check_grads(dp, ref, x)
    for _ in range(2):
        dp(x).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(stats, model.norm.buffers()))
    assert dp.rewrites[0].details["frozen_buffers"] == ["running_mean", "running_var", "num_batches_tracked"]


def test_freeze_needs_running_statistics():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(fxdp.UnsupportedModelError, match="no running statistics"):
        privatize(model, rewrite_options={"batchnorm": "freeze"})


# -- instance norm running statistics ----------------------------------------------------

@pytest.mark.parametrize("affine", [True, False])
def test_instance_norm_running_stats_are_turned_off(affine):
    torch.manual_seed(20 + affine)
    inorm = nn.InstanceNorm1d(4, affine=affine, track_running_stats=True)
    model = randomize(Net(inorm, 4, 3))
    stats = [b.clone() for b in inorm.buffers()]
    dp = privatize(model)
    new = dp.norm
    assert type(new) is nn.InstanceNorm1d and not new.track_running_stats and new.running_mean is None
    if affine:
        assert new.weight is inorm.weight
    (r,) = dp.rewrites
    assert (r.original, r.replacement, r.reversible) == ("InstanceNorm1d", "InstanceNorm1d", False)
    assert "running statistics" in r.reason
    check_grads(dp, reference(model, nn.InstanceNorm1d(4, affine=affine)), input_for(3, spatial=5))
    assert all(torch.equal(a, b) for a, b in zip(stats, inorm.buffers()))


def test_instance_norm_without_running_stats_is_left_alone():
    model = nn.Sequential(nn.Conv1d(3, 4, 1), nn.InstanceNorm1d(4, affine=True))
    assert privatize(model).rewrites == []
    assert privatize(nn.InstanceNorm1d(4, affine=True)).rewrites == []  # also as the root


# -- refusals and options -----------------------------------------------------------------

def test_functional_batch_norm_is_still_refused():
    class FBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(4))
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.batch_norm(x, None, None, self.g, None, training=True))

    with pytest.raises(fxdp.UnsupportedOpError, match="batch statistics"):
        privatize(FBN())


def test_off_keeps_refusing_batchnorm():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(fxdp.UnsupportedOpError, match="GroupNorm"):
        privatize(model, rewrite_options={"batchnorm": "off"})
    model[1].requires_grad_(False)  # no parameter to capture, still mixes samples
    with pytest.raises(fxdp.UnsupportedOpError, match="batch statistics"):
        privatize(model, rewrite_options={"batchnorm": "off"})
    # the capture pass' own refusal stays behind it (a BatchNorm that reaches it)
    gm = fxdp.tracer.trace(model[:2].requires_grad_(True))
    with pytest.raises(fxdp.UnsupportedOpError, match="batch statistics"):
        insert_captures(gm, Recorder())


@pytest.mark.parametrize("opts, match", [
    ({"batchnorm": "batch"}, "must be one of"),
    ({"batchnorm": "layernorm", "batchnorm_groups": 4}, "applies to batchnorm='groupnorm'"),
    ({"batchnorm_groups": 0}, "positive int"),
    ({"batchnorm_groups": 2.0}, "positive int"),
])
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        privatize(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), rewrite_options=opts)


def test_root_and_lazy_batchnorm_are_refused():
    with pytest.raises(fxdp.UnsupportedModelError, match="wrapper"):
        privatize(nn.BatchNorm1d(4))
    with pytest.raises(fxdp.UnsupportedModelError, match="forward pass"):
        privatize(nn.Sequential(nn.Linear(3, 4), nn.LazyBatchNorm1d()))


# -- a ResNet-style model trains -----------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += idt
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(8, 8, 1)
        self.layer2 = BasicBlock(8, 16, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer2(self.layer1(self.stem(x)))), 1))


def test_resnet_with_batchnorm_trains_with_per_sample_clipping():
    torch.manual_seed(30)
    model = ResNet()
    dp = privatize(model)
    assert len(dp.rewrites) == 6 and all(r.replacement == "DPGroupNorm" for r in dp.rewrites)
    x = torch.randn(6, 3, 8, 8)
    y = torch.randint(0, 3, (6,))
    # exact per-sample gradients through the rewritten model (strip(): plain, same parameters)
    out = dp(x)
    F.cross_entropy(out, y).backward()
    assert_grad_samples_match(dp, batch_of_one_grads(dp.strip(), [x], lambda o, i: F.cross_entropy(o, y[i:i + 1])))
    # a few steps of per-sample-clipped SGD (DP-SGD without noise) with an optimizer built on the original model
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    clip = 5.0
    losses = []
    for _ in range(10):
        dp.zero_grad()
        loss = F.cross_entropy(dp(x), y)
        loss.backward()
        losses.append(loss.item())
        params = [p for p in dp.parameters() if p.requires_grad]
        norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params]).norm(dim=0)
        factor = (clip / (norms + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad = torch.einsum("b,b...->...", factor, p.grad_sample) / x.shape[0]
        opt.step()
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.6 * losses[0]


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's norm-act layer, as it is written there: batch norm, then drop, then act."""

    def __init__(self, C):
        super().__init__(C)
        self.drop = nn.Identity()
        self.act = nn.Hardswish()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)
        return self.act(self.drop(x))


def test_norm_act_layers_keep_their_activation():
    """Replacing timm's BatchNormAct2d by a bare GroupNorm would drop the activation;
    the replacement normalizes per sample and keeps drop + act (exact per-sample grads)."""
    torch.manual_seed(6)
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 1), BatchNormAct2d(8), nn.Conv2d(8, 2, 1)))
    dp = privatize(model)
    assert [(r.path, r.original, r.replacement) for r in dp.rewrites] == [("1", "BatchNormAct2d", "DPGroupNormAct")]
    class GroupNormAct(nn.GroupNorm):
        def forward(self, x):
            return F.hardswish(super().forward(x))

    gn = GroupNormAct(getattr(dp, "1").num_groups, 8)
    ref = nn.Sequential(model[0], gn, model[2])
    with torch.no_grad():
        gn.weight.copy_(model[1].weight)
        gn.bias.copy_(model[1].bias)
    x = torch.randn(4, 3, 3, 3)
    check_grads(dp, ref, x)


def test_batchnorm_with_another_custom_forward_is_refused():
    class Scaled(nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x) + 1

    with pytest.raises(fxdp.UnsupportedModelError, match="own forward.*drop whatever"):
        privatize(nn.Sequential(nn.Conv2d(3, 4, 1), Scaled(4)))


def test_running_the_original_batchnorm_model_after_privatize_is_warned_once():
    """The rewrite works on a copy: the object passed keeps BatchNorm, never trained."""
    import warnings

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    x = torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dp = fxdp.privatize(model)
        dp(x).sum().backward()
        fxdp.check(model, (x,))  # reading the original model is not running it
        assert not [w for w in caught if "BatchNorm layers are replaced" in str(w.message)]
        model.eval()
        model(x)
        model(x)
    msgs = [str(w.message) for w in caught if "BatchNorm layers are replaced" in str(w.message)]
    assert len(msgs) == 1 and "Sequential.1 (BatchNorm2d)" in msgs[0] and "returned by make_private" in msgs[0]

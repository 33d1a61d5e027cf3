"""One training step of semiseg against the official GALoss loop, side by side in one process.

    git clone https://github.com/cicailalala/GALoss /tmp/galoss     # any checkout of GALoss
    python benchmarks/official_step.py --official /tmp/galoss        # 96^3, 16 filters, 2 threads
    python benchmarks/official_step.py --official /tmp/galoss --patch 48 --n-filters 8  # quick
    python benchmarks/official_step.py --official /tmp/galoss --methods ga_cps --profile

Nothing of GALoss is copied into semiseg: the script loads the official *modules*
``networks/vnet.py`` (VNet), ``networks/magicnet.py`` (VNet_Magic), ``GALoss.py`` (GADice, GACE),
``utils/cube_utils.py``, ``utils/cube_losses.py`` and ``utils/ramps.py`` from the checkout given
with ``--official`` at run time. The training scripts themselves cannot be imported (they parse
arguments, read data and call ``.cuda()`` at import), so the *iteration body* of each is
re-typed below as a harness function that calls the official modules in the official order:

* ``ga_cps``: ``train_Synapse_CPS.py`` (the loop body, lines ~231-282): VNet A (kaiming) and B
  (xavier) on the whole 2 + 2 batch, softmax, argmax pseudo labels, GACE(k=10, gamma 0.5) +
  GADice on the labelled crops for both networks, GACE(k=100) cross terms weighted by the
  epoch ramp-up, one backward, two SGD steps (momentum 0.9, weight decay 1e-4), poly lr.
* ``ga_magicnet``: ``train_Synapse_MagicNet.py`` (lines ~183-329): plain forward,
  cross-image partition and recovery (``cube_utils.get_part_and_rec_ind``), EMA teacher on
  the noisy unlabelled crops, GACE + GADice supervision, cube location loss
  (``cube_losses.cube_location_loss``), within-image partition and recovery, cube-wise
  pseudo-label blending (active: the steps timed are iterations > 100), the organ-class logger,
  the consistency Dice, the final loss, backward, SGD step, EMA update, poly lr (70k horizon).
* ``supervised``: GALoss has no labelled-only script. The reference is the CPS iteration
  reduced to network A's supervised terms: one VNet forwarded on the 2 labelled crops (what
  semiseg's ``supervised`` forwards for this batch), GACE(k=10, gamma 0.5) + GADice, one
  backward, one SGD step, poly lr. semiseg runs ``supervised`` with ``loss: ga`` (the
  ``vnet_lower`` configs), i.e. the same terms.

semiseg's side is one ``Trainer._step`` without the trainer around it: poly lr,
``method.training_step``, ``combine_losses`` with the method's weights, the logged loss values
read back (``float``), ``backward``, SGD over ``method.parameter_groups(1e-4)`` (momentum
0.9), ``method.after_step`` (EMA). Both sides get the same weights (the official networks'
state dicts converted with ``semiseg.models.convert``; network A and B for GA-CPS, student and
EMA teacher for GA-MagicNet) and the same fixed batch of 4 crops (2 labelled + 2 unlabelled,
smoothed noise whose labels are 14 intensity bands). Before timing, the first forward logits
of every official network and its semiseg counterpart are compared (max abs difference).

The two MagicNet implementations do not do identical work: semiseg encodes the 4 x 27 cubes
as one batch (equal with instance norm), decodes only the labelled crops' cubes with gradient
for the within-image term (the official loop decodes all four crops' cubes with gradient and
uses the labelled half), and with its default ``pseudo_cube_source: unlabeled`` decodes the
unlabelled crops' cubes without gradient for the blending (GALoss re-decodes images 0-1).

Timing: each side is warmed up once, then the official and semiseg steps alternate
``--repeats`` times (the order flips every repeat, so slow drift of a shared machine cancels).
The table gives the median wall seconds per step and the relative spread (max - min) / median
of each side, and four semiseg / official ratios: of the medians, the median of per-repeat
ratios (paired, adjacent in time), of the fastest steps (least disturbed on a shared machine),
and of the median process CPU times (all threads; blind to waiting for a core, but it counts
OpenMP threads spinning while a sibling is descheduled).

Data loading is not in either step: the official loop samples in two DataLoader workers that
overlap with compute, semiseg's trainer samples in the main process unless
``data.num_workers > 0`` (the Synapse/AMOS configs use 2, the phantom configs 0). So the
script also times ``TrainingBatches[i]`` on a phantom store (generated under
``--phantom-root``) and prints what sampling in the main process would add to each step.

On the CPU the official ``.cuda()`` calls are made no-ops (``torch.Tensor.cuda`` and
``nn.Module.cuda`` return ``self``) only while official code runs. Official imports that are
not installed and not used by the loaded functions (``timm``, ``einops``, ``skimage``) are
replaced by empty stand-ins while the modules load.

MagicNet limits of the official code: ``VNet_Magic``'s location head is sized for 16 base
filters and the cross-image recovery index is built for 16 channels, so GA-MagicNet always runs
with 16 filters (whatever ``--n-filters`` says); its cubes are ``patch // 3`` (32 at 96^3), and
cubes under 32 (e.g. 16 at 48^3) have a 1-voxel bottleneck that instance norm cannot
normalise, so both sides then use batch norm (the official network accepts
``normalization='batchnorm'``).

``--profile`` also runs one step of each side under ``torch.profiler`` and prints the top ops
by self CPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import io
import math
import statistics
import subprocess
import sys
import time
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
METHODS = ("supervised", "ga_cps", "ga_magicnet")
NUM_CLASSES = 14
BATCH = 4
LABELED = 2
BASE_LR = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
CPS_HORIZON = 17000  # GALoss CPS: --max_iteration 17000, poly over it
MAGIC_HORIZON = 70000  # GALoss MagicNet keeps MagicNet's 70k poly horizon
ITERATIONS_PER_EPOCH = 16  # official Synapse 20 %: 32 labelled slots / 2 per batch
# The timed steps are iterations FIRST_ITERATION, +1, ...: past MagicNet's blending start (100)
# and not a class-logger refresh (multiples of 20) for the first 19 of them.
FIRST_ITERATION = 101
MAGIC_CHANNELS = 16  # the official cross-image recovery index is built for 16 channels

# Official imports that the loaded functions never use; stand-ins when not installed.
_UNUSED_IMPORTS: dict[str, tuple[str, ...]] = {
    "timm.models.layers": ("trunc_normal_",),
    "einops": ("rearrange", "repeat"),
    "skimage.measure": ("label",),
}


# ------------------------------------------------------------------ official modules
@contextlib.contextmanager
def cuda_as_noop(enabled: bool = True) -> Iterator[None]:
    """``.cuda()`` returns ``self`` on tensors and modules while the block runs (CPU runs)."""
    if not enabled:
        yield
        return
    saved = torch.Tensor.cuda, nn.Module.cuda

    def same_tensor(self: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self

    def same_module(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        return self

    torch.Tensor.cuda = same_tensor  # type: ignore[method-assign]
    nn.Module.cuda = same_module  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda = saved  # type: ignore[method-assign]


@contextlib.contextmanager
def _stand_ins() -> Iterator[None]:
    """Empty modules for uninstalled imports of the official files, removed afterwards."""
    added: list[str] = []

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("stand-in for an official import that is not installed")

    for dotted, names in _UNUSED_IMPORTS.items():
        if importlib.util.find_spec(dotted.split(".")[0]) is not None:
            continue
        parts = dotted.split(".")
        for depth in range(1, len(parts) + 1):
            name = ".".join(parts[:depth])
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                added.append(name)
            if depth > 1:
                setattr(sys.modules[".".join(parts[:depth - 1])], parts[depth - 1],
                        sys.modules[name])
        for attr in names:
            setattr(sys.modules[dotted], attr, unavailable)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _load_file(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class Official:
    """The reusable GALoss modules, loaded from a checkout."""

    vnet: types.ModuleType
    magicnet: types.ModuleType
    galoss: types.ModuleType
    cube_utils: types.ModuleType
    cube_losses: types.ModuleType
    ramps: types.ModuleType


def load_official(root: Path) -> Official:
    """Load the official modules by file path under private names (the checkout has no
    packages, and its ``utils`` would shadow any other top-level ``utils``)."""
    files = {"vnet": "networks/vnet.py", "magicnet": "networks/magicnet.py",
             "galoss": "GALoss.py", "cube_utils": "utils/cube_utils.py",
             "cube_losses": "utils/cube_losses.py", "ramps": "utils/ramps.py"}
    missing = [rel for rel in files.values() if not (root / rel).is_file()]
    if missing:
        raise SystemExit(f"--official {root}: not a GALoss checkout (missing {missing}); "
                         "git clone https://github.com/cicailalala/GALoss /tmp/galoss")
    with _stand_ins():
        modules = {key: _load_file(root / rel, f"_galoss_official_{key}")
                   for key, rel in files.items()}
    return Official(**modules)


# ------------------------------------------------------------------ official iterations
def _init_weights(network: nn.Module, scheme: str) -> None:
    """semiseg's copy of the official CPS initialisation (kaiming A, xavier B), applied to the
    official networks (the script's own init functions cannot be imported)."""
    try:
        from semiseg.models.init import init_weights
    except ImportError:  # before the refactor of issue 17
        from semiseg.methods.cps import init_weights  # type: ignore[attr-defined,no-redef]
    init_weights(network, scheme)  # type: ignore[arg-type]


def _sgd(params: Any) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=BASE_LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def _poly(iteration: int, horizon: int) -> float:
    return BASE_LR * (1.0 - iteration / horizon) ** 0.9


class OfficialSupervised:
    """The CPS iteration reduced to network A's supervised terms (see the module docstring)."""

    def __init__(self, off: Official, n_filters: int, device: torch.device) -> None:
        self.on_cpu = device.type == "cpu"
        with cuda_as_noop(self.on_cpu):
            self.model_A = off.vnet.VNet(n_channels=1, n_classes=NUM_CLASSES,
                                         n_filters=n_filters).to(device)
            _init_weights(self.model_A, "kaiming")
            self.dice_loss = off.galoss.GADice()
            self.ce_loss = off.galoss.GACE(k=10, gama=0.5)
        self.optimizer_A = _sgd(self.model_A.parameters())
        self.model_A.train()

    def networks(self) -> dict[str, nn.Module]:
        return {"A": self.model_A}

    def step(self, volume_batch: Tensor, label_batch: Tensor, iter_num: int) -> Tensor:
        with cuda_as_noop(self.on_cpu):
            volume_batch, label_batch = volume_batch.cuda(), label_batch.cuda()
            labeled_volume_batch = volume_batch[:LABELED]
            output_A = self.model_A(labeled_volume_batch)
            outputs_A_soft = F.softmax(output_A, dim=1)
            label_l = label_batch[:LABELED]
            loss_seg = self.ce_loss(output_A, label_l.unsqueeze(1))
            loss_seg_dice = self.dice_loss(outputs_A_soft, label_l)
            loss = loss_seg + loss_seg_dice
            self.optimizer_A.zero_grad()
            loss.backward()
            self.optimizer_A.step()
            iter_num = iter_num + 1
            iter_n = min(iter_num, CPS_HORIZON - 1)
            for param_group in self.optimizer_A.param_groups:
                param_group["lr"] = _poly(iter_n, CPS_HORIZON)
        return loss.detach()


class OfficialCPS:
    """``train_Synapse_CPS.py``'s iteration."""

    def __init__(self, off: Official, n_filters: int, device: torch.device) -> None:
        self.on_cpu = device.type == "cpu"
        self.ramps = off.ramps
        with cuda_as_noop(self.on_cpu):
            self.model_A = off.vnet.VNet(n_channels=1, n_classes=NUM_CLASSES,
                                         n_filters=n_filters).to(device)
            self.model_B = off.vnet.VNet(n_channels=1, n_classes=NUM_CLASSES,
                                         n_filters=n_filters).to(device)
            _init_weights(self.model_A, "kaiming")
            _init_weights(self.model_B, "xavier")
            self.dice_loss = off.galoss.GADice()
            self.ce_loss = off.galoss.GACE(k=10, gama=0.5)
            self.ce_loss_k100 = off.galoss.GACE(k=100, gama=0.5)
        self.optimizer_A = _sgd(self.model_A.parameters())
        self.optimizer_B = _sgd(self.model_B.parameters())
        self.model_A.train()
        self.model_B.train()

    def networks(self) -> dict[str, nn.Module]:
        return {"A": self.model_A, "B": self.model_B}

    def step(self, volume_batch: Tensor, label_batch: Tensor, iter_num: int) -> Tensor:
        # The script computes cps_w once per epoch (0.1 * sigmoid ramp over max_epoch epochs).
        max_epoch = CPS_HORIZON // ITERATIONS_PER_EPOCH + 1
        cps_w = 0.1 * self.ramps.sigmoid_rampup(iter_num // ITERATIONS_PER_EPOCH, max_epoch)
        with cuda_as_noop(self.on_cpu):
            volume_batch, label_batch = volume_batch.cuda(), label_batch.cuda()
            output_A = self.model_A(volume_batch)
            output_B = self.model_B(volume_batch)
            outputs_A_soft = F.softmax(output_A, dim=1)
            outputs_B_soft = F.softmax(output_B, dim=1)
            max_A = torch.argmax(output_A.detach(), dim=1, keepdim=True).long()
            max_B = torch.argmax(output_B.detach(), dim=1, keepdim=True).long()
            label_l = label_batch[:LABELED]
            loss_seg = (self.ce_loss(output_A[:LABELED], label_l.unsqueeze(1))
                        + self.ce_loss(output_B[:LABELED], label_l.unsqueeze(1)))
            loss_seg_dice = (self.dice_loss(outputs_A_soft[:LABELED], label_l)
                             + self.dice_loss(outputs_B_soft[:LABELED], label_l))
            loss_sup = loss_seg + loss_seg_dice
            loss_cps = self.ce_loss_k100(output_A, max_B) + self.ce_loss_k100(output_B, max_A)
            loss = loss_sup + cps_w * loss_cps
            self.optimizer_A.zero_grad()
            self.optimizer_B.zero_grad()
            loss.backward()
            self.optimizer_A.step()
            self.optimizer_B.step()
            iter_num = iter_num + 1
            iter_n = min(iter_num, CPS_HORIZON - 1)
            lr_ = _poly(iter_n, CPS_HORIZON)
            for param_group in self.optimizer_A.param_groups:
                param_group["lr"] = lr_
            for param_group in self.optimizer_B.param_groups:
                param_group["lr"] = lr_
        return loss.detach()


class OfficialMagicNet:
    """``train_Synapse_MagicNet.py``'s iteration (GA-MagicNet)."""

    def __init__(self, off: Official, patch: int, cube_size: int, normalization: str,
                 device: torch.device, volume_batch: Tensor) -> None:
        self.on_cpu = device.type == "cpu"
        self.off = off
        self.cube_size = cube_size
        with cuda_as_noop(self.on_cpu):
            def create_model(ema: bool = False) -> nn.Module:
                model = off.magicnet.VNet_Magic(n_channels=1, n_classes=NUM_CLASSES,
                                                cube_size=cube_size, patch_size=patch,
                                                normalization=normalization).to(device)
                if ema:
                    for param in model.parameters():
                        param.detach_()
                return model

            self.model = create_model()
            self.ema_model = create_model(ema=True)
            self.dice_loss = off.galoss.GADice()
            self.ce_loss = off.galoss.GACE(k=10, gama=0.5)
            # Computed at iteration 0 in the script and kept.
            self.loc_list = off.cube_utils.get_loc_mask(volume_batch, cube_size)
        self.optimizer = _sgd(self.model.parameters())
        self.ema_model.train()
        self.dist_logger = off.cube_utils.OrganClassLogger(num_classes=NUM_CLASSES)

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.model, "teacher": self.ema_model}

    def forward_logits(self, name: str, volume: Tensor) -> Tensor:
        return self.networks()[name](volume)[0]

    def prime_class_logger(self, classes: Tensor) -> None:
        """A class distribution as the script has it after iteration 100 (so blending runs)."""
        self.dist_logger.append_class_list(classes.reshape(-1, 1))
        self.dist_logger.update_class_dist()

    def step(self, volume_batch: Tensor, label_batch: Tensor, iter_num: int) -> Tensor:
        off, cube_size, labeled_bs = self.off, self.cube_size, LABELED
        model, ema_model, dist_logger = self.model, self.ema_model, self.dist_logger
        cube_utils, cube_losses = off.cube_utils, off.cube_losses
        with cuda_as_noop(self.on_cpu):
            volume_batch, label_batch = volume_batch.cuda(), label_batch.cuda()
            unlabeled_volume_batch = volume_batch[labeled_bs:]
            labeled_volume_batch = volume_batch[:labeled_bs]

            model.train()
            outputs = model(volume_batch)[0]

            # Cross-image partition-and-recovery.
            bs, c, w, h, d = volume_batch.shape
            nb_cubes = h // cube_size
            cube_part_ind, cube_rec_ind = cube_utils.get_part_and_rec_ind(
                volume_shape=volume_batch.shape, nb_cubes=nb_cubes, nb_chnls=MAGIC_CHANNELS)
            img_cross_mix = volume_batch.view(bs, c, w, h, d)
            img_cross_mix = torch.gather(img_cross_mix, dim=0, index=cube_part_ind)
            img_cross_mix = img_cross_mix.view(bs, c, w, h, d)
            _outputs_mix, embedding = model(img_cross_mix)
            c_ = embedding.shape[1]
            pred_rec = torch.gather(embedding, dim=0, index=cube_rec_ind)
            pred_rec = pred_rec.view(bs, c_, w, h, d)
            outputs_unmix = model.forward_prediction_head(pred_rec)

            # Teacher pseudo labels.
            noise = torch.clamp(torch.randn_like(unlabeled_volume_batch) * 0.1, -0.2, 0.2)
            ema_inputs = unlabeled_volume_batch + noise
            with torch.no_grad():
                ema_output = ema_model(ema_inputs)[0]
                unlab_pl_soft = F.softmax(ema_output, dim=1)
                _pred_value_teacher, pred_class_teacher = torch.max(unlab_pl_soft, dim=1)
            loc_list = self.loc_list

            loss_seg = self.ce_loss(outputs[:labeled_bs], label_batch[:labeled_bs].unsqueeze(1))
            outputs_soft = F.softmax(outputs, dim=1)
            outputs_unmix_soft = F.softmax(outputs_unmix, dim=1)
            loss_seg_dice = self.dice_loss(outputs_soft[:labeled_bs], label_batch[:labeled_bs])
            loss_unmix_dice = self.dice_loss(outputs_unmix_soft[:labeled_bs],
                                             label_batch[:labeled_bs])
            supervised_loss = loss_seg + loss_seg_dice + loss_unmix_dice
            count_ss = 3

            # Magic-cube location reasoning.
            patch_list = cube_losses.get_patch_list(volume_batch, cube_size=cube_size)
            idx = torch.randperm(len(patch_list)).cuda()
            loc_loss: Any = 0
            feat_list = None
            if loc_list is not None:
                loc_loss, feat_list = cube_losses.cube_location_loss(
                    model, loc_list, patch_list, idx, labeled_bs, cube_size=cube_size)

            consistency_loss: Any = 0
            count_consist = 1

            # Within-image partition-and-recovery.
            if feat_list is not None:
                embed_list = []
                for i in range(bs):
                    _pred_tmp, embed_tmp = model.forward_decoder(feat_list[i])
                    embed_list.append(embed_tmp.unsqueeze(0))
                embed_all = torch.cat(embed_list, dim=0)
                embed_all_unmix = cube_losses.unmix_tensor(embed_all, labeled_volume_batch.shape)
                pred_all_unmix = model.forward_prediction_head(embed_all_unmix)
                unmix_pred_soft = F.softmax(pred_all_unmix, dim=1)
                loss_lab_local_dice = self.dice_loss(unmix_pred_soft[:labeled_bs],
                                                     label_batch[:labeled_bs])
                supervised_loss += loss_lab_local_dice
                count_ss += 1

            # Cube-wise pseudo-label blending.
            pred_class_mix = None
            with torch.no_grad():
                if iter_num > 100 and feat_list is not None:
                    current_organ_dist = dist_logger.get_class_dist().cuda()
                    current_organ_dist = current_organ_dist ** (1.0 / 1.0)  # args.T_dist
                    current_organ_dist = current_organ_dist / current_organ_dist.sum()
                    current_organ_dist = current_organ_dist / current_organ_dist.max()
                    weight_map = current_organ_dist[pred_class_teacher].unsqueeze(1).repeat(
                        1, NUM_CLASSES, 1, 1, 1)
                    unmix_pl = cube_losses.get_mix_pl(model, feat_list, volume_batch.shape,
                                                      bs - labeled_bs)
                    unlab_pl_mix = (1.0 - weight_map) * ema_output + weight_map * unmix_pl
                    unlab_pl_mix_soft = F.softmax(unlab_pl_mix, dim=1)
                    _, pred_class_mix = torch.max(unlab_pl_mix_soft, dim=1)
                    _conf, pr_class = torch.max(unlab_pl_mix_soft.detach(), dim=1)
                    dist_logger.append_class_list(pr_class.view(-1, 1))
                elif feat_list is not None:
                    _conf, pr_class = torch.max(unlab_pl_soft.detach(), dim=1)
                    dist_logger.append_class_list(pr_class.view(-1, 1))

            if iter_num % 20 == 0 and len(dist_logger.class_total_pixel_store):
                dist_logger.update_class_dist()

            # args.consistency * sigmoid_rampup(iter // 350, args.consistency_rampup)
            consistency_weight = 0.1 * off.ramps.sigmoid_rampup(iter_num // 350, 200.0)
            if pred_class_mix is None:
                consistency_loss_unmix = self.dice_loss(outputs_unmix_soft[labeled_bs:],
                                                        pred_class_teacher)
            else:
                consistency_loss_unmix = self.dice_loss(outputs_unmix_soft[labeled_bs:],
                                                        pred_class_mix)
            consistency_loss += consistency_loss_unmix
            supervised_loss /= count_ss
            consistency_loss /= count_consist

            loss = supervised_loss + 0.1 * loc_loss + consistency_weight * consistency_loss
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()

            # update_ema_variables(model, ema_model, args.ema_decay, iter_num)
            alpha = min(1 - 1 / (iter_num + 1), 0.99)
            for ema_param, param in zip(ema_model.parameters(), model.parameters()):
                ema_param.data.mul_(alpha).add_(param.data, alpha=1 - alpha)

            iter_num = iter_num + 1
            lr_ = BASE_LR * (1.0 - iter_num / MAGIC_HORIZON) ** 0.9
            for param_group in self.optimizer.param_groups:
                param_group["lr"] = lr_
        return loss.detach()


# ------------------------------------------------------------------ semiseg side
@dataclass
class Setting:
    """The network setting one method runs with (MagicNet overrides filters and norm)."""

    patch: int
    n_filters: int
    cube_size: int = 0
    normalization: str = "batchnorm"

    def describe(self) -> str:
        text = f"{self.patch}^3, {self.n_filters} filters"
        if self.cube_size:
            text += f", {self.cube_size}^3 cubes, {self.normalization}"
        return text


def method_setting(name: str, patch: int, n_filters: int, cube: int) -> Setting:
    if name != "ga_magicnet":
        return Setting(patch, n_filters)
    cube = cube or (patch // 3 if patch % 3 == 0 else patch // 2)
    if cube % 16 or patch % cube:
        raise SystemExit(f"ga_magicnet: cube {cube} must be a multiple of 16 dividing {patch}")
    # Instance norm cannot normalise the 1-voxel bottleneck of cubes under 32.
    norm = "instancenorm" if cube >= 32 else "batchnorm"
    return Setting(patch, MAGIC_CHANNELS, cube, norm)


def build_semiseg(name: str, setting: Setting, device: torch.device) -> Any:
    sys.path.insert(0, str(HERE))
    from train_step import _model_name

    from semiseg.data.classes import get_class_set
    from semiseg.methods.base import MethodContext

    try:
        from semiseg.catalog import build_method
    except ImportError:  # before the refactor of issue 17 it lived in semiseg.methods.base
        from semiseg.methods.base import build_method  # type: ignore[attr-defined,no-redef]

    model = _model_name(name)
    model_options: dict[str, Any] = {"n_filters": setting.n_filters}
    options: dict[str, Any] = {}
    if name == "supervised":
        options["loss"] = "ga"  # the GA hosts' supervised terms (configs vnet_lower*)
    if model == "magicnet":
        options["cube_size"] = setting.cube_size
        model_options["normalization"] = setting.normalization
    fields = {
        "num_classes": NUM_CLASSES, "model_name": model, "model_options": model_options,
        "patch_size": (setting.patch,) * 3, "max_iterations": CPS_HORIZON,
        "class_names": ("background", *get_class_set("synapse").names)}
    # Only the fields this version has (issue 17 removed max_iterations and weight_decay).
    known = {f.name for f in dataclasses.fields(MethodContext)}
    context = MethodContext(**{k: v for k, v in fields.items() if k in known})
    return build_method(name, context, options).to(device).train()


def _converted(state: dict[str, Tensor], kind: str) -> dict[str, Tensor]:
    """The official state dict under semiseg's names. ``convert_official_state_dict`` checks
    against the default (instance-norm) MagicNet; a batch-norm MagicNet is renamed key by key
    with the same table and then loaded strictly."""
    from semiseg.errors import CheckpointError
    from semiseg.models.convert import convert_official_state_dict, official_to_semiseg_key

    try:
        return convert_official_state_dict(state, kind)
    except CheckpointError:
        if kind != "galoss-magicnet":
            raise
    renamed = {official_to_semiseg_key(k, kind): v for k, v in state.items()}
    if None in renamed:
        raise RuntimeError("official MagicNet keys without a semiseg counterpart")
    return renamed  # type: ignore[return-value]


def semiseg_networks(name: str, method: Any) -> dict[str, nn.Module]:
    """semiseg's networks under the keys of the official harness's ``networks()``."""
    if hasattr(method, "networks"):  # Method.networks(): trained ones, then EMA teachers
        found = method.networks()
        keys = {"supervised": ("A",), "ga_cps": ("A", "B"),
                "ga_magicnet": ("student", "teacher")}[name]
        return dict(zip(keys, (*found.trained, *found.teachers), strict=True))
    if name == "supervised":
        return {"A": method.network}
    if name == "ga_cps":
        return {"A": method.net_a, "B": method.net_b}
    return {"student": method.network, "teacher": method.teacher.network}


def copy_weights(name: str, official: Any, method: Any) -> None:
    kind = "galoss-magicnet" if name == "ga_magicnet" else "galoss-vnet"
    ours = semiseg_networks(name, method)
    for key, network in official.networks().items():
        state = {k: v.detach().clone() for k, v in network.state_dict().items()}
        ours[key].load_state_dict(_converted(state, kind), strict=True)


class SemisegStep:
    """``Trainer._step`` for one process, fp32, no DDP (see the module docstring)."""

    def __init__(self, name: str, method: Any, device: torch.device) -> None:
        self.method = method
        self.device = device
        self.horizon = MAGIC_HORIZON if name == "ga_magicnet" else CPS_HORIZON
        self.optimizer = torch.optim.SGD(method.parameter_groups(WEIGHT_DECAY), lr=BASE_LR,
                                         momentum=MOMENTUM)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = BASE_LR * group.get("lr_scale", 1.0)

    def step(self, batch: Any, iteration: int) -> Tensor:
        from semiseg.engine.objective import combine_losses
        from semiseg.engine.optim import poly_lr
        from semiseg.methods.base import StepInfo

        step = StepInfo(iteration, CPS_HORIZON, ITERATIONS_PER_EPOCH)
        lr = poly_lr(BASE_LR, min(iteration, self.horizon - 1), self.horizon, 0.9)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        batch = batch.to(self.device)
        terms = self.method.training_step(batch, step)
        total, _ = combine_losses(terms, self.method.loss_weights(step), {})
        # The trainer reads every term back each step (logging, the non-finite check).
        values = [float(total.detach()), *(float(v.detach()) for v in terms.values())]
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError(f"non-finite loss at iteration {iteration}")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.method.after_step(step)
        return total.detach()


# ------------------------------------------------------------------ batch, parity, timing
def make_batch(patch: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """4 crops of smoothed noise in [0, 1]; the 2 labelled ones labelled by 14 intensity bands
    (as ``device_check.py``: a phantom-like, learnable signal)."""
    gen = torch.Generator().manual_seed(seed)
    image = F.avg_pool3d(torch.rand(BATCH, 1, patch, patch, patch, generator=gen), 5, 1, 2)
    image = (image - image.min()) / (image.max() - image.min())
    label = (image[:LABELED, 0] * NUM_CLASSES).long().clamp_max(NUM_CLASSES - 1)
    return image, label


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds of one step: wall clock, and CPU time of this process (all threads). On a
    shared machine the wall clock also counts time the process waited for a core; the CPU
    time does not (but does count OpenMP threads spinning while a sibling thread waits)."""

    wall: float
    cpu: float
    loss: float


def _timed(fn: Callable[[], Tensor], device: torch.device) -> Timing:
    gc.collect()  # a collection inside the timed region would land on one side only
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    loss = fn()
    _sync(device)
    return Timing(time.perf_counter() - wall, time.process_time() - cpu, float(loss))


@torch.no_grad()
def parity(name: str, official: Any, method: Any, image: Tensor) -> dict[str, float]:
    """Max abs difference of the first forward logits, official vs semiseg, per network (train
    mode, as trained; both sides' batch-norm statistics then move alike)."""
    ours = semiseg_networks(name, method)
    result = {}
    for key, network in official.networks().items():
        with cuda_as_noop(official.on_cpu):
            theirs = network(image)
        theirs = theirs[0] if isinstance(theirs, tuple) else theirs
        result[key] = float((theirs - ours[key](image)).abs().max())
    return result


@dataclass
class Row:
    method: str
    setting: str
    official: list[Timing]
    semiseg: list[Timing]
    parity: dict[str, float]
    warmup_loss: tuple[float, float]

    def wall(self, side: str) -> list[float]:
        return [t.wall for t in getattr(self, side)]

    def cpu(self, side: str) -> list[float]:
        return [t.cpu for t in getattr(self, side)]

    def paired_ratio(self) -> float:
        """Median over repeats of semiseg / official of the same repeat (adjacent in time)."""
        return statistics.median(o.wall / t.wall for o, t in zip(self.semiseg, self.official))


def _spread(times: list[float]) -> float:
    return (max(times) - min(times)) / statistics.median(times)


def run_method(name: str, off: Official, args: argparse.Namespace,
               device: torch.device) -> Row:
    from semiseg.methods.base import Batch

    setting = method_setting(name, args.patch, args.n_filters, args.cube)
    image, label = make_batch(setting.patch)
    image, label = image.to(device), label.to(device)
    torch.manual_seed(args.seed)
    official: Any
    with warnings.catch_warnings():  # GACE passes the deprecated reduce=False to its base
        warnings.simplefilter("ignore", UserWarning)
        if name == "supervised":
            official = OfficialSupervised(off, setting.n_filters, device)
        elif name == "ga_cps":
            official = OfficialCPS(off, setting.n_filters, device)
        else:
            official = OfficialMagicNet(off, setting.patch, setting.cube_size,
                                        setting.normalization, device, image)
    torch.manual_seed(args.seed)
    method = build_semiseg(name, setting, device)
    copy_weights(name, official, method)
    checks = parity(name, official, method, image)
    if name == "ga_magicnet":  # a class distribution, so that blending runs from the start
        official.prime_class_logger(label)
        method.class_logger.append(label)
        method.class_logger.refresh()
    ours = SemisegStep(name, method, device)
    batch = Batch(image, label, LABELED, [f"crop{i}" for i in range(BATCH)])

    def official_step(it: int) -> Callable[[], Tensor]:
        return lambda: official.step(image, label, it)

    def semiseg_step(it: int) -> Callable[[], Tensor]:
        return lambda: ours.step(batch, it)

    it = FIRST_ITERATION
    warm_off = _timed(official_step(it), device)
    warm_ours = _timed(semiseg_step(it), device)
    print(f"  {name} warm-up: official {warm_off.wall:.2f} s, semiseg {warm_ours.wall:.2f} s",
          flush=True)
    times_off: list[Timing] = []
    times_ours: list[Timing] = []
    for repeat in range(args.repeats):
        it += 1
        pairs = [(times_off, official_step(it)), (times_ours, semiseg_step(it))]
        for times, fn in pairs if repeat % 2 == 0 else reversed(pairs):
            times.append(_timed(fn, device))
        print(f"  {name} repeat {repeat + 1}: official {times_off[-1].wall:.2f} s "
              f"(cpu {times_off[-1].cpu:.2f}), semiseg {times_ours[-1].wall:.2f} s "
              f"(cpu {times_ours[-1].cpu:.2f})", flush=True)
    if args.profile:
        profile(name, official_step(it + 1), semiseg_step(it + 1), args.profile_rows)
    return Row(name, setting.describe(), times_off, times_ours, checks,
               (warm_off.loss, warm_ours.loss))


def profile(name: str, official_fn: Callable[[], Tensor], semiseg_fn: Callable[[], Tensor],
            rows: int) -> None:
    """Top ops by self CPU time of one step on each side."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for side, fn in (("official", official_fn), ("semiseg", semiseg_fn)):
        gc.collect()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n--- profile {name}, {side}: top {rows} ops by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


# ------------------------------------------------------------------ sampling
def sampling_seconds(args: argparse.Namespace) -> tuple[list[float], str]:
    """Seconds per ``TrainingBatches[i]`` (main process) on a phantom store, as the trainer
    draws them with ``data.num_workers: 0``."""
    from semiseg.config import load_config
    from semiseg.data.classes import get_class_set
    from semiseg.data.phantom import generate_dataset
    from semiseg.engine.setup import prepare_run_data

    shape = [int(s) for s in args.phantom_shape]
    root = Path(args.phantom_root) / f"phantom_{'x'.join(map(str, shape))}"
    p = args.patch
    config = load_config(REPO / "configs" / "phantom" / "ga_cps.yaml", overrides=[
        f"data.root={root}", f"data.patch_size=[{p}, {p}, {p}]",
        f"data.phantom.shape={shape}", f"data.phantom.num_cases={args.phantom_cases}"])
    # Generated here without a progress bar; prepare_run_data then finds the cases there.
    generate_dataset(root, num_cases=args.phantom_cases, shape=shape,
                     class_set=get_class_set("synapse"), seed=0, progress=False)
    with contextlib.redirect_stderr(io.StringIO()):  # its "0 cases" progress bar
        data = prepare_run_data(config)
    batches = data.batches
    batches[0]  # first touch: reads the cases into memory (in_memory: true)
    times = []
    for i in range(1, args.sampling_batches + 1):
        start = time.perf_counter()
        batches[i]
        times.append(time.perf_counter() - start)
    where = (f"{len(data.labeled_ids)} labelled + {len(data.unlabeled_ids)} unlabelled "
             f"phantom cases of {'x'.join(map(str, shape))} in {root}")
    return times, where


# ------------------------------------------------------------------ main
def _git_describe(path: Path) -> str:
    """Commit of a checkout, with "+changes" when its tracked files are modified."""
    try:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "-uno"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return head + (" +changes" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True,
                        help="a GALoss checkout (git clone .../cicailalala/GALoss)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--n-filters", type=int, default=16,
                        help="VNet base filters (GA-MagicNet always uses 16, see above)")
    parser.add_argument("--cube", type=int, default=0,
                        help="MagicNet cube size (default patch // 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one step of each side (top ops by self CPU time)")
    parser.add_argument("--profile-rows", type=int, default=20)
    parser.add_argument("--sampling-batches", type=int, default=5,
                        help="batches to time for sampling (0: skip)")
    parser.add_argument("--phantom-root", default="/tmp/semiseg_official_step",
                        help="where the phantom store for the sampling check is generated")
    parser.add_argument("--phantom-shape", nargs=3, type=int, default=[160, 160, 80],
                        help="phantom volume shape (default: the prepared Synapse grid)")
    parser.add_argument("--phantom-cases", type=int, default=30)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    off = load_official(args.official.resolve())
    print(f"official code: {args.official} ({_git_describe(args.official)}) | semiseg "
          f"{_git_describe(REPO)} | torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, device {device}", flush=True)

    rows = [run_method(name, off, args, device) for name in args.methods]

    print("\nParity of the first forward logits (max abs difference, official vs semiseg):")
    for row in rows:
        checks = ", ".join(f"{k} {v:.2e}" for k, v in row.parity.items())
        print(f"  {row.method:<12} {checks}   (warm-up step loss: official "
              f"{row.warmup_loss[0]:.6f}, semiseg {row.warmup_loss[1]:.6f})")

    print(f"\nTraining step, batch {BATCH} ({LABELED} labelled), {args.repeats} alternating "
          f"repeats after 1 warm-up per side, {torch.get_num_threads()} threads, {device}. "
          "Wall: median s/step and (max-min)/median; ratio = semiseg/official of the medians; "
          "paired = median of per-repeat ratios; best = ratio of the fastest steps (least "
          "disturbed by other jobs); cpu = ratio of the median process CPU times.")
    header = (f"{'method':<12}{'setting':<46}{'official':>9}{'spread':>7}{'semiseg':>9}"
              f"{'spread':>7}{'ratio':>7}{'paired':>7}{'best':>7}{'cpu':>7}")
    print(header)
    print("-" * len(header))
    medians: dict[str, float] = {}
    for row in rows:
        t_off, t_ours = statistics.median(row.wall("official")), statistics.median(
            row.wall("semiseg"))
        cpu_ratio = statistics.median(row.cpu("semiseg")) / statistics.median(
            row.cpu("official"))
        medians[row.method] = t_ours
        print(f"{row.method:<12}{row.setting:<46}{t_off:>9.2f}"
              f"{_spread(row.wall('official')):>7.0%}{t_ours:>9.2f}"
              f"{_spread(row.wall('semiseg')):>7.0%}{t_ours / t_off:>7.2f}"
              f"{row.paired_ratio():>7.2f}"
              f"{min(row.wall('semiseg')) / min(row.wall('official')):>7.2f}{cpu_ratio:>7.2f}")

    if args.sampling_batches > 0:
        times, where = sampling_seconds(args)
        sample = statistics.median(times)
        print(f"\nSampling (semiseg TrainingBatches[i], main process): median {sample:.3f} s "
              f"per batch of {BATCH} {args.patch}^3 crops (spread {_spread(times):.0%}; "
              f"{where})")
        for method, t_ours in medians.items():
            print(f"  {method:<12} with data.num_workers 0 a step becomes {t_ours + sample:.2f} s"
                  f" (+{sample / t_ours:.1%}); with workers (as the official 2) sampling "
                  "overlaps the step")


if __name__ == "__main__":
    main()

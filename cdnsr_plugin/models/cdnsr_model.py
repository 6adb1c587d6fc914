"""CDNSRModel: BasicSR's SRModel with a staged routing schedule (ClassSR, CDNSR) and routed validation."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import torch
from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY
from torch.nn.parallel import DataParallel, DistributedDataParallel

from cdnsr_plugin.archs.pruning import DEFAULT_WIDTHS, WIDTH_KEYS, prunable, prune
from cdnsr_plugin.inference.costs import CONVENTIONS, CostTable, cost_table
from cdnsr_plugin.inference.engine import EngineOptions, RoutedEngine
from cdnsr_plugin.models.branch_cache import BranchOutputCache
from cdnsr_plugin.models.stages import Stage, parse_stages, stage_at, stage_rate
from cdnsr_plugin.registry import register
from cdnsr_plugin.utils.batches import IterationBatchSampler
from cdnsr_plugin.utils.checkpoint import load_parts, part_paths

CLASSIFIER_INPUTS = ('probs', 'weights')  # what a loss needs the classifier for
LABEL_ROUTINGS = ('labels', 'backbone', 'all')  # stages that route without the classifier


def routing_inputs(loss: torch.nn.Module) -> tuple[str, ...]:
    """What ``loss`` is called with: its ``routing_inputs`` (the plugin's losses), else ``(sr, gt)`` (BasicSR's
    pixel and perceptual losses)."""
    return tuple(getattr(loss, 'routing_inputs', ('sr', 'gt')))


def stage_input_errors(opt: dict[str, Any], losses: dict[str, torch.nn.Module], stages: list[Stage],
                       net: torch.nn.Module) -> list[str]:
    """Stages whose data or routing cannot feed their losses (``losses`` built from ``train.losses``, ``net`` the
    ``CDNSRNet`` of ``network_g``)."""
    errors = []
    dataset_type = opt['datasets']['train'].get('type')
    for stage in stages:
        key = f'train.stages[{stage.index}] ({stage.name})'
        if stage.routing == 'labels' and dataset_type != 'DifficultyPairedDataset':
            errors.append(f'{key} routes by data labels: datasets.train.type must be DifficultyPairedDataset, '
                          f'got {dataset_type}')
        needs_probs = [n for n in stage.losses if set(routing_inputs(losses[n])) & set(CLASSIFIER_INPUTS)]
        if stage.routing in LABEL_ROUTINGS and needs_probs:
            errors.append(f'{key} routes by {stage.routing}, so {needs_probs} would see no classifier output')
        if stage.frozen == 'classifier' and needs_probs:
            errors.append(f'{key} freezes the classifier, so {needs_probs} cannot train anything')
        if stage.prune:
            arches = [branch.get('type') for branch in getattr(net, 'branch_opts', [])]
            if len(set(arches)) != 1 or not prunable(arches[0]):
                errors.append(f'{key} prunes the branches from the largest one: they must share one prunable arch '
                              f'(FSRCNN, CARN, MSRResNet, EDSR), got {arches}')
    return errors


class StageCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """The stage schedule's learning rate (``stages.stage_rate``), stepped by BasicSR's loop as its own schedulers
    are: step ``k - 1`` before iteration ``k``."""

    def __init__(self, optimizer: torch.optim.Optimizer, stages: list[Stage], eta_min: float) -> None:
        self.stages, self.eta_min = stages, eta_min
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [stage_rate(self.stages, self.last_epoch + 1, base, self.eta_min) for base in self.base_lrs]

    def state_dict(self) -> dict:
        """Plain values only (resume states are read with ``weights_only=True``): the stages come from the options."""
        return {key: value for key, value in super().state_dict().items() if key != 'stages'}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict({key: value for key, value in state_dict.items() if key != 'stages'})


def _nonnegative_errors(train_opt: dict, key: str, default: float, what: str) -> list[str]:
    """``train.<key>`` (default ``default``) must be a finite number >= 0; ``what`` completes the message."""
    value = train_opt.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float('inf'):
        return [f'train.{key} must be {what}, got {value!r}']
    return []


def floor_errors(train_opt: dict) -> list[str]:
    """``train.min_branch_weight`` must be a number >= 0."""
    return _nonnegative_errors(train_opt, 'min_branch_weight', 1.0, 'a number >= 0 (0: off)')


def cache_errors(train_opt: dict) -> list[str]:
    """``train.branch_cache_gb`` must be a number >= 0 (0 turns the branch-output cache off)."""
    return _nonnegative_errors(train_opt, 'branch_cache_gb', 4, 'a number of GB >= 0 (0: no cache)')


@register(MODEL_REGISTRY)
class CDNSRModel(SRModel):
    """Routed SR model trained in stages: ClassSR (Sec. 3.7, 3 stages) and CDNSR (Sec. III-D, 4 stages).

    ``network_g`` is a ``CDNSRNet``. ``train.stages`` (see ``cdnsr_plugin/models/stages.py``) lists the
    stages; the stage of an iteration follows from the iteration number, so a resumed run continues in
    the right stage. Losses are configured once under ``train.losses`` and weighted per stage:

    * pixel losses (basicsr's ``L1Loss``, ...): on the routed output vs. GT (ClassSR's Image-Loss,
      CDNSR's L_res);
    * the plugin's losses name their inputs in ``routing_inputs``: ``probs`` (the classifier's
      probabilities), ``weights`` (the routing weights of the forward pass, e.g. the Gumbel sample),
      ``outputs`` (every branch's output), ``costs`` (the branches' FLOPs at the training patch size,
      ``train.flops_convention``, default ``paper``), ``sr``, ``gt``, ``lq``: ``ClassLoss``, ``AverageLoss``
      (ClassSR eqs. 3-4), ``FLOPsRegLoss`` (CDNSR eqs. 2-3), ``PixelKDLoss``, ``ContrastiveKDLoss`` (CDNSR
      eqs. 7-8), ``DualFLOPsLoss`` and ``OracleLabelLoss`` (budget-meeting routers, beyond the papers).

    Inherited from SRModel unchanged: network building and ``path.pretrain_network_g`` loading,
    optimizer set-up, EMA, saving, the validation loop and metrics. Overridden: training set-up
    (stages, losses, part loading), ``feed_data`` (labels), ``optimize_parameters``, ``test`` (routed
    inference through ``RoutedEngine``, the executor ``tools/test_patches.py`` uses, with the classifier's
    argmax; every pixel covered), ``nondist_validation`` (adds routing statistics),
    ``model_to_device`` (DDP on CPU too), ``resume_training`` (tells the batch sampler where the loop restarts)
    and ``save`` (checks that DDP ranks hold the same weights).

    Extra ``path`` keys: ``pretrain_network_classifier``, ``pretrain_network_branch0`` ... (a plain
    BasicSR checkpoint such as MSRResNet's fits a branch of that arch), ``param_key_parts``,
    ``strict_load_parts``. Extra ``val`` keys, read as the tester reads them (``EngineOptions.from_val``):
    ``patch`` (32), ``stride`` (28), ``max_batch`` (16 on CPU, 128 on CUDA), ``channels_last`` (true),
    ``precision`` (fp32).
    """

    # ------------------------------------------------------------------ set-up
    def __init__(self, opt: dict[str, Any]) -> None:
        self._cost_tables: dict[int, CostTable] = {}  # filled by costs(); used during super().__init__
        super().__init__(opt)
        if not self.is_train:
            self._load_parts()

    @property
    def bare_net(self) -> torch.nn.Module:
        return self.get_bare_model(self.net_g)

    def model_to_device(self, net: torch.nn.Module) -> torch.nn.Module:
        """As BaseModel, but DDP also on CPU (gloo), and with unused parameters allowed: a stage that
        freezes a part runs it without autograd."""
        net = net.to(self.device)
        if self.opt['dist']:
            device_ids = [torch.cuda.current_device()] if self.device.type == 'cuda' else None
            return DistributedDataParallel(net, device_ids=device_ids, find_unused_parameters=True)
        if self.opt['num_gpu'] > 1:
            return DataParallel(net)
        return net

    def init_training_settings(self) -> None:
        self._load_parts()
        train_opt = self.opt['train']
        self.losses, errors = self._build_losses(train_opt.get('losses') or {})
        self.stages, stage_errors = parse_stages(train_opt, set(train_opt.get('losses') or {}))
        errors += stage_errors + (
            stage_input_errors(self.opt, self.losses, self.stages, self.bare_net) if not stage_errors else [])
        errors += cache_errors(train_opt) + floor_errors(train_opt)
        if errors:
            raise ValueError('invalid training options (nothing was trained):\n  - ' + '\n  - '.join(errors))
        patch = self.opt['datasets']['train'].get('gt_size', 32 * self.opt['scale']) // self.opt['scale']
        convention = train_opt.get('flops_convention', 'paper')
        costs = [branch.value(convention) for branch in self.costs(patch).branches]
        self.branch_costs = torch.tensor(costs, dtype=torch.float64, device=self.device)
        self.ema_decay = train_opt.get('ema_decay', 0)
        if self.ema_decay > 0:
            self.net_g_ema = build_network(self.opt['network_g']).to(self.device)
            self.model_ema(0)
            self.net_g_ema.eval()
        self.net_g.train()
        self._stage: Optional[Stage] = None
        self._batches = self._link_batches()
        self.branch_cache = BranchOutputCache(int(float(train_opt.get('branch_cache_gb', 4)) * 2**30))
        self.setup_optimizers()
        self.setup_schedulers()

    def _link_batches(self) -> Optional[IterationBatchSampler]:
        """Hand the stages' batch sizes to the training loader's batch sampler (``utils/batches.py``), which BasicSR
        built before this model. ``None`` without one (a model built outside BasicSR's training pipeline): then a
        stage's ``batch_size_per_gpu`` cannot be honoured and is an error."""
        batches = IterationBatchSampler.current(self.opt['datasets']['train'])
        if batches is None:
            sized = [f'train.stages[{stage.index}].batch_size_per_gpu' for stage in self.stages if stage.batch_size]
            if sized:
                raise ValueError(f'{", ".join(sized)} needs the training loader of python -m cdnsr_plugin.train (or '
                                 "of BasicSR's train.py with the plugin installed), which sizes batches by stage")
            return None
        batches.set_stage_sizes([(stage.start, stage.batch_size) for stage in self.stages])
        return batches

    def resume_training(self, resume_state: dict) -> None:
        """BasicSR's resume, and the batch sampler told where the loop restarts (it sizes batches by iteration)."""
        super().resume_training(resume_state)
        if self._batches is not None:
            self._batches.resume(resume_state['epoch'], resume_state['iter'])

    def _build_losses(self, loss_opts: dict) -> tuple[dict[str, torch.nn.Module], list[str]]:
        losses, errors = {}, []
        for name, loss_opt in loss_opts.items():
            try:
                losses[name] = build_loss(dict(loss_opt)).to(self.device)
            except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
                errors.append(f'train.losses.{name}: {exc}')
        return losses, errors

    def setup_schedulers(self) -> None:
        """``CosineAnnealingRestartLR`` without ``periods``: one cosine per stage (``StageCosineLR``: each stage's
        ``lr`` and ``lr_period``); with ``periods`` (or another type), BasicSR's own scheduler."""
        scheduler = self.opt['train'].get('scheduler') or {}
        if scheduler.get('type') != 'CosineAnnealingRestartLR' or 'periods' in scheduler:
            return super().setup_schedulers()
        unknown = set(scheduler) - {'type', 'eta_min'}
        if unknown:
            raise ValueError(f'train.scheduler: {sorted(unknown)} need train.scheduler.periods; with stages, give each '
                             'stage its lr and lr_period instead')
        eta_min = float(scheduler.get('eta_min', 0))
        self.schedulers = [StageCosineLR(optimizer, self.stages, eta_min) for optimizer in self.optimizers]

    def _load_parts(self) -> None:
        """``path.pretrain_network_classifier`` and ``path.pretrain_network_branch<i>`` (not when resuming).

        The key names follow BasicSR's ``pretrain_network_*`` convention, so its option parsing expands
        ``~`` in them and does not mistake them for folders to create.
        """
        path_opt = self.opt['path']
        if path_opt.get('resume_state'):
            return
        load_parts(
            self.bare_net.named_parts(),
            part_paths(path_opt),
            path_opt.get('param_key_parts'),
            path_opt.get('strict_load_parts', True),
            log=get_root_logger().info)

    def costs(self, patch: int) -> CostTable:
        """Per-patch cost table of the routed network at LR patch size ``patch`` (cached)."""
        if patch not in self._cost_tables:
            self._cost_tables[patch] = cost_table(self.bare_net, patch=patch)
        return self._cost_tables[patch]

    # ------------------------------------------------------------------ training
    def feed_data(self, data: dict[str, Any]) -> None:
        super().feed_data(data)
        self.labels = data['label'].to(self.device) if 'label' in data else None
        self.keys = data.get('key', data.get('lq_path'))  # sub-image keys (LMDB) for the branch-output cache

    def optimize_parameters(self, current_iter: int) -> None:
        stage = stage_at(self.stages, current_iter)
        self._check_batch(current_iter)
        if stage is not self._stage:
            get_root_logger().info(f'Stage {stage.index + 1}/{len(self.stages)} "{stage.name}" from iter '
                                   f'{stage.start} to {stage.end}: training {", ".join(stage.train)}, '
                                   f'routing {stage.routing}, losses {stage.losses}, {self._batch_note()}')
            if current_iter == stage.start and stage.prune:
                self._prune_branches()
            if current_iter == stage.start and stage.index > 0:
                self._reset_optimizer_state(stage)
            if current_iter == stage.start:
                for name in stage.losses:  # e.g. DualFLOPsLoss restarts its price (its keep_price option)
                    getattr(self.losses[name], 'start_stage', lambda: None)()
            self.branch_cache.clear()  # the branches may have changed
            self._stage = stage
        self.optimizer_g.zero_grad(set_to_none=True)
        tau = stage.tau_at(current_iter)
        batch = self._forward(stage, tau)
        self.output = batch['sr']
        loss_dict: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, weight in stage.losses.items():
            loss = self.losses[name]
            loss_dict[f'l_{name}'] = weight * loss(*(batch[key] for key in routing_inputs(loss)))
        total = sum(loss_dict.values())
        if not torch.isfinite(total):
            raise FloatingPointError(
                f'training stopped: the loss is {total.item()} at iter {current_iter} (stage {stage.name}, '
                f'{ {k: v.item() for k, v in loss_dict.items()} }); nothing was updated. {self._last_good()}')
        total.backward()
        # a loss read every branch's output (_forward computed them for it): distillation
        self._skip_unreached_branches(batch['weights'], teacher_only=batch['outputs'] is not None)
        self.optimizer_g.step()
        loss_dict['l_total'] = total
        self.log_dict = self.reduce_loss_dict(loss_dict)
        self.log_dict.update(self._routing_log(stage, batch['probs'], tau, batch['weights']))
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)

    def _check_batch(self, current_iter: int) -> None:
        """The batch must be the one the sampler planned for this iteration (a stage's ``batch_size_per_gpu``)."""
        if self._batches is not None and self.lq.shape[0] != self._batches.size_at(current_iter):
            raise RuntimeError(f'iteration {current_iter} got a batch of {self.lq.shape[0]} samples but its stage '
                               f'asks for {self._batches.size_at(current_iter)}: the training loader is not the one '
                               'compat.full_epochs builds (train with python -m cdnsr_plugin.train)')

    def _batch_note(self) -> str:
        """``batch N`` (this process), and under DDP the global batch (all ranks change stage together)."""
        from mmengine import dist
        local = self.lq.shape[0]
        if dist.get_world_size() == 1:
            return f'batch {local}'
        total = torch.tensor(float(local), device=self.device)
        dist.all_reduce(total, op='sum')
        return f'batch {local} per process, {int(total.item())} in all'

    def _last_good(self) -> str:
        """Where the last good weights are, for the message of a stop (none saved yet: say so)."""
        folder = Path(self.opt['path']['models'])
        saved = sorted(folder.glob('net_g_*.pth'), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
        if not saved:
            return f'No checkpoint was saved yet (in {folder}): lower the learning rate or check the data and losses'
        return f'The last good checkpoint is {saved[-1]}'

    def _skip_unreached_branches(self, weights: Optional[torch.Tensor] = None, teacher_only: bool = False) -> None:
        """A branch whose gradients are all exactly zero this iteration gets no update, nor one whose routing weights
        over the batch sum to less than ``train.min_branch_weight`` (default 1: one sample's worth, which with one-hot
        routing is "no sample"; 0 turns this part off). ``teacher_only``: a loss reads every branch's output
        (distillation), which trains the smaller branches directly, so the floor applies to the largest branch only,
        the teacher the distillation losses detach.

        With one-hot routing (straight-through Gumbel, hard) a branch that no sample went through has exactly
        zero gradients (unless a loss reads its outputs directly, e.g. distillation), and Adam would still step
        it by ``lr * m / sqrt(v)`` from the moments of the last batch that reached it: about 1 / (1 - beta1)
        full-size steps per rare Gumbel draw. Measured in the CDNSR recipe's fine-tuning stage, where the
        classifier sampled the backbone on a few patches: the unused backbone fell from 30.95 to 28.06 dB on a
        validation photo (docs/RESULTS.md). Its gradients set to ``None``, Adam skips it (moments and weight
        decay included). Under DDP the gradients are already averaged over the ranks, so all decide alike.

        The weight floor is the same drift with the paper's soft Gumbel weights: a branch the classifier has all but
        abandoned gets gradients of its weight (1e-9 and less in the CDNSR recipe's fine-tuning) times the mixture's,
        which Adam normalises into full-size steps that fit the mixture's residual, not the target: the unused
        backbone fell from 32.75 to 29.71 dB on the simplest validation tiles (docs/RESULTS.md); in distillation the
        students follow the drifting teacher. Under DDP the weight sums are summed over the ranks first.
        """
        floor = float(self.opt['train'].get('min_branch_weight', 1.0))
        sums = None
        if weights is not None and floor > 0:
            sums = weights.detach().double().sum(dim=0)
            from mmengine import dist
            if dist.get_world_size() > 1:
                dist.all_reduce(sums, op='sum')
            sums = sums.tolist()
        branches = self.bare_net.branches
        for j, branch in enumerate(branches):
            grads = [p.grad for p in branch.parameters() if p.grad is not None]
            # one device sync per branch, not per parameter
            unreached = grads and torch.stack([g.detach().abs().amax() for g in grads]).amax().item() == 0
            floored = sums is not None and sums[j] < floor and (not teacher_only or j == len(branches) - 1)
            if grads and (unreached or floored):
                for param in branch.parameters():
                    param.grad = None

    def _reset_optimizer_state(self, stage: Stage) -> None:
        """A new stage starts with fresh optimizer moments, as the papers' stages were separate runs.

        Adam's first moment from the previous stage would otherwise keep moving a part that the new stage
        does not reach (zero gradients still get a step ``lr * m / sqrt(v)``), for about 1 / (1 - beta1)
        iterations at the restarted learning rate. Not done when resuming mid-stage, where BasicSR
        restores the saved optimizer state.
        """
        self.optimizer_g.state.clear()
        get_root_logger().info(f'Stage "{stage.name}": optimizer state reset (fresh moments for the new stage)')

    def _prune_branches(self) -> None:
        """Every branch but the largest becomes the largest one channel-pruned to its width (CDNSR Sec. III-A)."""
        net = self.bare_net
        largest, options = net.branches[-1], net.branch_opts[-1]
        key, default = WIDTH_KEYS[options['type']], DEFAULT_WIDTHS[options['type']]
        for index, branch_opt in enumerate(net.branch_opts[:-1]):
            width = int(branch_opt.get(key, default))
            _, small = prune(options, largest, width)
            net.branches[index].load_state_dict(small.state_dict())
            get_root_logger().info(f'Branch {index} ({branch_opt["type"]} {key}={width}) pruned from the largest '
                                   f'branch ({key}={options.get(key, default)}): its largest-L1 filters kept')

    def _forward(self, stage: Stage, tau: Optional[float]) -> dict[str, Any]:
        """The routed forward pass of the stage and everything its losses may read (see ``routing_inputs``)."""
        need_outputs = any('outputs' in routing_inputs(self.losses[name]) for name in stage.losses)
        lq, gt = self.lq, self.gt
        if stage.routing in LABEL_ROUTINGS:
            lq, gt, labels = self._label_batch(stage)
            result = self.net_g(lq, labels=labels, return_outputs=need_outputs, return_weights=True)
        else:
            result = self.net_g(
                lq,
                routing=stage.routing,
                tau=tau,
                frozen=stage.frozen,
                return_outputs=need_outputs,
                return_weights=True,
                outputs=self._cached_outputs(stage, need_outputs),
                hard_gumbel=stage.hard_gumbel)
        return {
            'sr': result[0], 'probs': result[1], 'outputs': result[2] if need_outputs else None, 'weights': result[-1],
            'gt': gt, 'lq': lq, 'costs': self.branch_costs.to(result[1].dtype)
        }

    def _cached_outputs(self, stage: Stage, need_outputs: bool) -> Optional[list[torch.Tensor]]:
        """The frozen branches' outputs on the batch from ``branch_cache`` (``models/branch_cache.py``), in a stage
        that trains only the classifier and mixes (soft, Gumbel) or reads every branch's output; ``None`` where the
        network must run the branches itself (they learn, the routing is hard, the batch has no keys, or
        ``train.branch_cache_gb`` is 0)."""
        usable = stage.frozen == 'branches' and (stage.routing in ('soft', 'gumbel') or need_outputs)
        if not usable or self.keys is None or self.branch_cache.limit_bytes <= 0:
            return None
        return self.branch_cache.outputs(list(self.keys), self.lq, self.bare_net.branch_outputs)

    def _label_batch(self, stage: Stage) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs, targets and branch per sample of a stage that routes without the classifier: ``labels`` (the
        data's class), ``backbone`` (the largest branch), ``all`` (every sample through every branch, the
        batch repeated once per branch)."""
        batch, classes = self.lq.shape[0], self.bare_net.num_classes
        if stage.routing == 'labels':
            if self.labels is None:
                raise ValueError(f'stage {stage.name} routes by labels but the batch has none')
            return self.lq, self.gt, self.labels
        if stage.routing == 'backbone':
            return self.lq, self.gt, torch.full((batch, ), classes - 1, dtype=torch.long, device=self.device)
        labels = torch.arange(classes, device=self.device).repeat_interleave(batch)
        return self.lq.repeat(classes, 1, 1, 1), self.gt.repeat(classes, 1, 1, 1), labels

    def _routing_log(self, stage: Stage, probs: torch.Tensor, tau: Optional[float],
                     weights: torch.Tensor) -> dict[str, float]:
        """Class shares of the batch (argmax), FLOPs as % of the largest branch both soft (the probabilities'
        expectation, what CDNSR's eq. 2 constrains) and hard (the argmax, what the test runs), the mean largest
        probability (ClassSR's Class-Loss pushes it to 1), tau, and the price of a ``DualFLOPsLoss``."""
        probs = probs.detach()
        choice = probs.argmax(1)
        shares = torch.bincount(choice, minlength=probs.shape[1]).double() / probs.shape[0]
        relative = self.branch_costs / self.branch_costs.max()
        log = {f'cls{j}': float(v) for j, v in enumerate(shares)}
        # the weight each branch had in what the loss saw (the Gumbel sample, soft probabilities or one-hot labels)
        log.update({f'mix{j}': float(v) for j, v in enumerate(weights.detach().double().mean(dim=0))})
        log.update(
            stage=float(stage.index + 1),
            flops_pct=100.0 * float((probs.double() @ relative).mean()),
            flops_hard_pct=100.0 * float(relative[choice].mean()),
            max_prob=float(probs.max(1).values.mean()))
        if tau is not None:
            log['tau'] = tau
        if self.branch_cache.lookups:
            log['cache_hits'] = self.branch_cache.hit_rate()
        for name in stage.losses:
            if hasattr(self.losses[name], 'price'):
                log[f'price_{name}'] = float(self.losses[name].price)
        return log

    # ------------------------------------------------------------------ validation
    def test(self) -> None:
        """Routed inference of the whole LR image through ``RoutedEngine`` with the classifier's argmax: the
        same executor, options and decision as ``tools/test_patches.py``, so both report the same PSNR."""
        engine = getattr(self, '_val_engine', None) or self._make_engine()
        result = engine.super_resolve(self.lq)
        self.output = result.sr[None]
        counts = torch.bincount(result.labels, minlength=engine.num_classes)
        self._val_counts = counts if getattr(self, '_val_counts', None) is None else self._val_counts + counts

    def _make_engine(self) -> RoutedEngine:
        net = self.net_g_ema if hasattr(self, 'net_g_ema') else self.bare_net
        return RoutedEngine(net, EngineOptions.from_val(self.opt.get('val')), self.device)

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img) -> None:
        self._val_counts = None
        self._val_engine = self._make_engine()  # one engine for the whole set (a converted copy is made once)
        try:
            super().nondist_validation(dataloader, current_iter, tb_logger, save_img)
        finally:
            self._val_engine = None
        if self._val_counts is not None:
            self._log_routing(dataloader.dataset.opt['name'], current_iter, tb_logger)

    def _log_routing(self, dataset_name: str, current_iter: Any, tb_logger) -> None:
        counts = self._val_counts.tolist()
        table = self.costs((self.opt.get('val') or {}).get('patch', 32))
        percent = {c: table.routed_percent(counts, c) for c in CONVENTIONS}
        shares = ', '.join(f'{100.0 * n / sum(counts):.1f}%' for n in counts)
        get_root_logger().info(
            f'Routing on {dataset_name}: patches per class {counts} ({shares}); FLOPs per patch incl. classifier '
            f"{percent['paper']:.1f}% (paper) / {percent['macs']:.1f}% (MACs) of the largest branch")
        if tb_logger and isinstance(current_iter, int):
            for convention, value in percent.items():
                tb_logger.add_scalar(f'routing/{dataset_name}/flops_pct_{convention}', value, current_iter)
            for j, n in enumerate(counts):
                tb_logger.add_scalar(f'routing/{dataset_name}/class{j}_share', n / sum(counts), current_iter)

    # ------------------------------------------------------------------ saving
    def save(self, epoch: int, current_iter: int) -> None:
        super().save(epoch, current_iter)
        if self.opt['dist']:
            self._check_ranks_agree()

    def _check_ranks_agree(self) -> None:
        """All DDP ranks must hold identical weights; log the check, raise if they diverged."""
        from mmengine.dist import all_gather
        params = torch.cat([p.detach().double().flatten() for p in self.bare_net.parameters()])
        fingerprint = torch.stack([params.sum(), (params * params).sum()])
        gathered = all_gather(fingerprint)
        if any(not torch.equal(other, fingerprint) for other in gathered):
            raise RuntimeError(f'DDP ranks hold different weights: fingerprints {[g.tolist() for g in gathered]}')
        get_root_logger().info(f'DDP check: weights identical on {len(gathered)} ranks '
                               f'(sum {fingerprint[0].item():.6f}, sum of squares {fingerprint[1].item():.6f})')

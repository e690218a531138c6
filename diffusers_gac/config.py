"""``GACConfig``: the options of a quantization, validated up front with errors that name the option.

A config holds three kinds of things, kept apart:

* **options** (plain fields): what the user chooses. The *format* options decide the layout of the quantized model
  (bits, activation scheme, which layers); the *calibration* options decide how it is calibrated. Both are
  serialisable; a checkpoint's ``config.json`` keeps the format options at the top level and the calibration options
  under ``"calibration"`` (only those that shaped the result).
* **runtime inputs** (``calibration_inputs``, a :class:`CalibrationInputs`): tensors and callables a calibration is
  run on; used while calibrating, never saved; and the load-time choice ``execution`` (how the frozen layers run,
  which does not change the checkpoint, so it is never saved either: any checkpoint loads with any choice).
* **outputs** (``layout``, a :class:`QuantizedLayout`): written by calibration, never set by the user: which layers
  were converted and how, so a saved checkpoint can rebuild its quantized layers before its weights load.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from diffusers.utils import logging

from .checks import check_bits, check_bool, check_choice, check_number, check_positive, check_seed, suggest
from .inputs import CalibrationInputs
from .layout import QuantizedLayout

logger = logging.get_logger(__name__)


class GACQuantizationMethod(str, Enum):
    GAC = "gac"


WEIGHTINGS = ("uniform", "gradient_aligned", "fisher")
RECONSTRUCTIONS = ("adaround", "none")
ACT_SCHEMES = ("static", "timestep", "dynamic")
WEIGHT_INITS = ("minmax", "mse")
TIMESTEP_SELECTIONS = ("uniform", "normal", "all")
EXECUTIONS = ("auto", "integer", "fake")

# options that fix the quantized layout: needed to rebuild a checkpoint (top level of config.json)
FORMAT_OPTIONS = ("w_bits", "a_bits", "act_scheme", "act_timestep_groups", "attn_bits", "special_bits",
                  "split_skip_inputs", "modules_to_not_convert", "act_group_size", "act_clipping", "smoothing",
                  "lowrank_rank", "lowrank_bits")
# the activation-side levers (off by default); a checkpoint using one is format 2, which earlier releases refuse
LEVER_DEFAULTS = {"act_group_size": None, "act_clipping": False, "smoothing": False, "lowrank_rank": 0,
                  "lowrank_bits": 16}
LOWRANK_BITS = (8, 16)
FORMAT_VERSION = 2


@dataclass(kw_only=True)
class GACConfig(QuantizationConfigMixin):
    """Post-training quantization of a diffusers denoiser with (gradient-aligned) block reconstruction.

    Format (saved; they decide the quantized layout):
        w_bits: weight bits (2-8), per output channel, uniform affine.
        a_bits: bits of every quantized layer's input (2-8), or ``None`` for weight-only quantization.
        act_scheme: ``"static"`` (one learned range per tensor), ``"timestep"`` (one learned range per timestep
            group) or ``"dynamic"`` (a range per token computed at run time).
        act_timestep_groups: number of timestep groups for ``act_scheme="timestep"``.
        attn_bits: bits of the attention matmul inputs (queries, keys, values, softmax probabilities), or ``None``
            to keep those matmuls in full precision.
        special_bits: bits (weights and inputs) of the first layer, the last layer and the timestep embedding;
            ``None`` keeps them in full precision. Other layers use ``w_bits``/``a_bits``.
        split_skip_inputs: give the two halves of concatenated UNet skip inputs their own quantizers.
        modules_to_not_convert: module names (or name prefixes) kept in full precision.
    Activation-side levers for 4-bit activations (off by default; docs/levers.md says which layers take which):
        act_group_size: with ``act_scheme="dynamic"``, a range per token and per group of this many input channels
            instead of per token (``None``); an input whose channels it does not divide keeps per-token ranges.
        act_clipping: with ``act_scheme="dynamic"``, shrink every token's min-max range by a per-layer ratio searched
            on the calibration data (4 bits spend fewer levels on outliers).
        smoothing: divide each layer input channel by a scale moved into the weight (SmoothQuant), its strength
            searched per layer on the calibration data; exact before quantization.
        lowrank_rank: keep the top singular directions of each 4-bit layer's (smoothed) weight as a float branch
            beside the quantized residual: a rank (``int``, 0: none) or a fraction in (0, 1) of the smaller weight
            dimension. A layer gets at most half its smaller dimension.
        lowrank_bits: storage of the branch's factors: 16 (float16 values) or 8 (int8 codes with a float16 scale per
            row: half the branch's bytes; the residual absorbs the codes' rounding, so the split stays exact).
    Calibration data:
        calib_num_inference_steps: sampler steps of the full-precision trajectories the data comes from.
        calib_timestep_selection: ``"uniform"`` (evenly spaced, Q-Diffusion), ``"normal"`` (PTQ4DM-style, centred on
            the late middle of the trajectory) or ``"all"``.
        calib_num_timesteps: how many sampler steps to keep (``"uniform"``/``"normal"``).
        calib_samples_per_timestep: samples kept at each kept step (the number of trajectories).
        calib_guidance_scale: classifier-free guidance scale of calibration trajectories driven by
            ``calibration_inputs.prompt_embeds`` (1: no guidance).
    Reconstruction:
        weight_init: weight range initialisation, ``"mse"`` (error-minimising search) or ``"minmax"``.
        reconstruction: ``"adaround"`` (learned rounding and activation steps, block by block) or ``"none"``
            (round-to-nearest with calibrated ranges).
        weighting: how calibration samples are weighted in the reconstruction loss: ``"gradient_aligned"`` (weights
            learned by GAC, below; the default), ``"uniform"`` (every sample alike, Q-Diffusion; the default with
            ``reconstruction="none"``, which has no loss to weight, and with ``act_scheme="static"``, where learned
            weights cost sample quality and time) or ``"fisher"`` (a fixed per-timestep weighting by
            the unit's output sensitivity, the non-learned baseline; ``calibration/fisher.py``).
        iters: optimisation steps per unit; batch_size: samples per step.
        lr_round / lr_act / lr_lowrank: Adam learning rates of the rounding variables, the activation step sizes and
            the low-rank branch's factors (0: the factors stay the SVD's).
        round_reg_weight: weight of AdaRound's rounding regulariser; round_warmup: fraction of ``iters`` without it.
        seed: seeds every random choice of the calibration.
    Gradient-aligned weighting (``weighting="gradient_aligned"``, see ``calibration/gac.py``; ``GACConfig.paper()``
    gives the paper's formulation):
        gac_meta_steps: meta-steps on the weight logits before a unit's reconstruction (the paper's order).
        gac_meta_every: a meta-step every this many reconstruction steps once AdaRound's warm-up is over (0: none).
        gac_meta_lr: Adam learning rate of the weight logits.
        gac_virtual_lr / gac_virtual_step: size and kind (``"normalized"`` or ``"sgd"``) of the virtual update.
        gac_temperature: softmax temperature of the weights.
        gac_groups: contiguous timestep groups treated as tasks by the gradient-matching term.
        gac_val_fraction: timestep-balanced share of the unit's samples held out for the validation objective.
        gac_gm_weight / gac_gm_form: weight and similarity (``"cosine"`` or the paper's ``"dot"``) of the
            gradient-matching term; 0 turns it off (plain learning-to-reweight).
        gac_max_logit: bound on the absolute weight logits (None: unbounded, as in the paper).
        gac_validation: where the validation samples come from: ``"calibration"`` (a held-out share of the
            calibration set, as in the paper) or ``"quantized_trajectories"`` (denoiser inputs recorded while the
            round-to-nearest quantized model samples: the states the quantized sampler really visits).
        gac_validation_trajectories: trajectories recorded for ``"quantized_trajectories"``, and sampled per step
            to measure the step influence of ``gac_validation_weighting="sample_influence"``.
        gac_validation_target: where the validation error is measured: ``"unit"`` (the unit's output against the
            full-precision unit output, as the reconstruction loss) or ``"output"`` (the denoiser's output against
            the full-precision denoiser's: the unit's virtually updated output is propagated through the rest of
            the network, later units still in full precision).
        gac_weight_granularity: ``"timestep"`` (one logit per sampler step, shared by that step's samples) or
            ``"sample"`` (one logit per calibration sample, as in the paper).
        gac_val_rounding: rounding of the weights in the validation pass: ``"hard"`` (the final choice, with
            straight-through gradients: the error reconstruction ends with) or ``"soft"`` (AdaRound's soft rounding,
            as in the paper).
        gac_validation_weighting: how the validation samples' errors add up: ``"uniform"`` (a plain mean, as in the
            paper) or ``"sample_influence"`` (each weighted by how much an error at its sampler step moves the end
            of the trajectory, measured once on the full-precision model by perturbation,
            ``calibration/influence.py``; needs a scheduler or a sampler).
    Runtime inputs (never saved):
        calibration_inputs: a :class:`CalibrationInputs` (prompt embeddings or a sampler) for denoisers whose
            calibration trajectories ``from_pretrained`` cannot produce by itself (text-conditional ones).
        execution: how the frozen model runs once calibrated or loaded: ``"integer"`` (int8 GEMMs on the CPU for
            every layer with quantized inputs, ``quant/intexec.py``), ``"fake"`` (the fake-quant reference:
            dequantized weights, float ops) or ``"auto"`` (integer for the layers on a CPU with the kernels that are
            wide enough to gain from them, fake for the others; on a GPU, per layer and input shape the faster of
            the integer kernels and the reference computed densely in the input's dtype, timed on first use).
            Passing ``GACConfig(execution=...)`` to ``from_pretrained`` of a calibrated checkpoint sets it (its
            other options come from the checkpoint); ``diffusers_gac.set_execution(model, ...)`` changes it later.
    Written by calibration (leave unset):
        layout: the :class:`QuantizedLayout` of the calibrated model.
    """

    quant_method: GACQuantizationMethod = GACQuantizationMethod.GAC
    # -- format ---------------------------------------------------------------------------------------------------
    w_bits: int = 4
    a_bits: int | None = 4
    act_scheme: str = "dynamic"
    act_timestep_groups: int = 5
    attn_bits: int | None = None
    special_bits: int | None = 8
    split_skip_inputs: bool = True
    modules_to_not_convert: list[str] | None = None
    act_group_size: int | None = None
    act_clipping: bool = False
    smoothing: bool = False
    lowrank_rank: int | float = 0
    lowrank_bits: int = 16
    # -- calibration data -----------------------------------------------------------------------------------------
    calib_num_inference_steps: int = 25
    calib_timestep_selection: str = "uniform"
    calib_num_timesteps: int = 25
    calib_samples_per_timestep: int = 64
    calib_guidance_scale: float = 1.0
    # -- reconstruction -------------------------------------------------------------------------------------------
    weight_init: str = "mse"
    reconstruction: str = "adaround"
    weighting: str | None = None
    iters: int = 400
    batch_size: int = 32
    lr_round: float = 1e-2
    lr_act: float = 4e-4
    lr_lowrank: float = 0.0
    round_reg_weight: float = 0.01
    round_warmup: float = 0.2
    seed: int = 0
    # -- gradient-aligned weighting -------------------------------------------------------------------------------
    gac_meta_steps: int = 0
    gac_meta_every: int = 20
    gac_meta_lr: float = 0.05
    gac_virtual_lr: float = 1e-2
    gac_virtual_step: str = "normalized"
    gac_temperature: float = 1.0
    gac_groups: int = 5
    gac_val_fraction: float = 0.05
    gac_gm_weight: float = 1.0
    gac_gm_form: str = "cosine"
    gac_max_logit: float | None = 2.0
    gac_validation: str = "calibration"
    gac_validation_trajectories: int = 8
    gac_validation_target: str = "unit"
    gac_weight_granularity: str = "timestep"
    gac_val_rounding: str = "hard"
    gac_validation_weighting: str = "uniform"
    # -- runtime inputs and outputs -------------------------------------------------------------------------------
    calibration_inputs: CalibrationInputs | None = field(default=None, repr=False, compare=False)
    execution: str = field(default="auto", compare=False)
    layout: QuantizedLayout | None = None

    def __new__(cls, *args, **kwargs):
        if args:  # the first positional argument would land in quant_method and be dropped
            raise TypeError(f"GACConfig takes keyword arguments only, e.g. GACConfig(w_bits={args[0]!r}); got "
                            f"{len(args)} positional argument{'s' if len(args) > 1 else ''}")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if self.quant_method not in (GACQuantizationMethod.GAC, GACQuantizationMethod.GAC.value):
            raise ValueError(f"quant_method must be 'gac' (it names this backend), got {self.quant_method!r}")
        self.quant_method = GACQuantizationMethod.GAC
        if isinstance(self.layout, dict):
            self.layout = QuantizedLayout.from_dict(self.layout)
        self.post_init()

    def post_init(self) -> None:
        check_bits("w_bits", self.w_bits)
        check_bits("a_bits", self.a_bits, allow_none=True)
        check_bits("special_bits", self.special_bits, allow_none=True)
        check_bits("attn_bits", self.attn_bits, allow_none=True)
        check_bool("split_skip_inputs", self.split_skip_inputs)
        self._check_levers()
        check_choice("act_scheme", self.act_scheme, ACT_SCHEMES)
        check_choice("execution", self.execution, EXECUTIONS)
        check_choice("weight_init", self.weight_init, WEIGHT_INITS)
        check_choice("calib_timestep_selection", self.calib_timestep_selection, TIMESTEP_SELECTIONS)
        check_choice("reconstruction", self.reconstruction, RECONSTRUCTIONS)
        if self.weighting is None:  # learned weights where they do not lose (docs/results/gac.md, "The default")
            uniform = self.reconstruction == "none" or self.act_scheme == "static"
            self.weighting = "uniform" if uniform else "gradient_aligned"
        check_choice("weighting", self.weighting, WEIGHTINGS)
        for name in ("act_timestep_groups", "calib_num_inference_steps", "calib_num_timesteps",
                     "calib_samples_per_timestep", "iters", "batch_size"):
            check_positive(name, getattr(self, name))
        for name in ("lr_round", "lr_act"):
            check_positive(name, getattr(self, name), float)
        check_number("lr_lowrank", self.lr_lowrank, 0)
        if self.lowrank_bits == 8 and self.lr_lowrank:
            raise ValueError(f"lr_lowrank={self.lr_lowrank!r} refines float factors, and lowrank_bits=8 stores them as "
                             "integer codes: use lr_lowrank=0 with lowrank_bits=8, or lowrank_bits=16")
        check_number("round_reg_weight", self.round_reg_weight, 0)
        check_number("round_warmup", self.round_warmup, 0, 1, what="a fraction in [0, 1)")
        if self.calib_num_timesteps > self.calib_num_inference_steps and self.calib_timestep_selection == "uniform":
            raise ValueError(f"calib_num_timesteps ({self.calib_num_timesteps}) cannot exceed calib_num_inference_steps "
                             f"({self.calib_num_inference_steps}) with calib_timestep_selection='uniform'")
        g = self.calib_guidance_scale
        check_number("calib_guidance_scale", g, 1, what="a finite number >= 1 (1: no guidance)")
        inputs = self.calibration_inputs
        if inputs is not None and not isinstance(inputs, CalibrationInputs):
            raise ValueError(f"calibration_inputs must be a diffusers_gac.CalibrationInputs, got {type(inputs).__name__}")
        if g > 1 and inputs is not None and inputs.prompt_embeds is not None and inputs.negative_prompt_embeds is None:
            raise ValueError("calib_guidance_scale > 1 needs calibration_inputs.negative_prompt_embeds (the empty "
                             "prompt's embeddings)")
        if self.modules_to_not_convert is not None and (
            not isinstance(self.modules_to_not_convert, (list, tuple))
            or not all(isinstance(m, str) and m for m in self.modules_to_not_convert)
        ):
            raise ValueError(f"modules_to_not_convert must be a list of module names, got {self.modules_to_not_convert!r}")
        if self.reconstruction == "none" and self.weighting != "uniform":
            raise ValueError(f"weighting={self.weighting!r} weights the samples of the reconstruction loss, and "
                             "reconstruction='none' has no loss (round-to-nearest): use weighting='uniform' with "
                             "reconstruction='none', or reconstruction='adaround'")
        self._check_gac_options()
        check_seed("seed", self.seed)
        if self.layout is not None:
            if not isinstance(self.layout, QuantizedLayout):
                raise ValueError(f"layout must be a QuantizedLayout (written by calibration), got "
                                 f"{type(self.layout).__name__}")
            self.layout.check()
            problems = self.layout.disagreements(self)
            if problems:
                raise ValueError("the quantization config contradicts its own layout (the list of converted "
                                 f"layers): {'; '.join(problems)}")

    def _check_levers(self) -> None:
        if self.act_group_size is not None:
            check_positive("act_group_size", self.act_group_size)
        check_bool("act_clipping", self.act_clipping)
        check_bool("smoothing", self.smoothing)
        for name in ("act_group_size", "act_clipping"):
            if getattr(self, name) not in (None, False) and self.act_scheme != "dynamic":
                raise ValueError(f"{name} shapes the ranges computed per token at run time, so it needs "
                                 f"act_scheme='dynamic', got act_scheme={self.act_scheme!r}")
        rank = self.lowrank_rank
        if isinstance(rank, bool) or not (isinstance(rank, int) and rank >= 0 or isinstance(rank, float) and 0 < rank < 1):
            raise ValueError(f"lowrank_rank must be an integer >= 0 (0: no low-rank branch) or a fraction in (0, 1) of "
                             f"a layer's smaller weight dimension, got {rank!r}")
        if isinstance(self.lowrank_bits, bool) or self.lowrank_bits not in LOWRANK_BITS:
            raise ValueError(f"lowrank_bits must be 16 (float16 factors) or 8 (int8 codes), got {self.lowrank_bits!r}")

    def uses_levers(self) -> bool:
        return any(getattr(self, k) != v for k, v in LEVER_DEFAULTS.items())

    def _check_gac_options(self) -> None:
        for name in ("gac_meta_lr", "gac_virtual_lr", "gac_temperature"):
            check_positive(name, getattr(self, name), float)
        check_positive("gac_groups", self.gac_groups)
        for name in ("gac_meta_steps", "gac_meta_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        check_choice("gac_virtual_step", self.gac_virtual_step, ("normalized", "sgd"))
        check_choice("gac_gm_form", self.gac_gm_form, ("cosine", "dot"))
        check_choice("gac_validation", self.gac_validation, ("calibration", "quantized_trajectories"))
        check_positive("gac_validation_trajectories", self.gac_validation_trajectories)
        check_choice("gac_validation_target", self.gac_validation_target, ("unit", "output"))
        check_choice("gac_weight_granularity", self.gac_weight_granularity, ("timestep", "sample"))
        check_choice("gac_val_rounding", self.gac_val_rounding, ("hard", "soft"))
        check_choice("gac_validation_weighting", self.gac_validation_weighting, ("uniform", "sample_influence"))
        check_number("gac_val_fraction", self.gac_val_fraction, 0, 0.5, what="a fraction in [0, 0.5)")
        check_number("gac_gm_weight", self.gac_gm_weight, 0)
        if self.gac_max_logit is not None:
            check_positive("gac_max_logit", self.gac_max_logit, float)

    @classmethod
    def paper(cls, **options) -> GACConfig:
        """GAC as the paper formulates it: one logit per calibration sample, 20 meta-steps before each unit's
        reconstruction (weights frozen after), soft rounding in the validation pass, gradient matching by cosine
        over 5 timestep groups, a 5% validation split. ``options`` override or add (``w_bits``, ``a_bits``, ...)."""
        paper = dict(weighting="gradient_aligned", gac_weight_granularity="sample", gac_meta_steps=20, gac_meta_every=0,
                     gac_val_rounding="soft", gac_gm_weight=1.0, gac_gm_form="cosine", gac_groups=5,
                     gac_val_fraction=0.05)
        return cls(**{**paper, **options})

    # -- the three kinds --------------------------------------------------------------------------------------------
    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """Every serialisable option (format and calibration), in declaration order."""
        runtime = ("quant_method", "calibration_inputs", "execution", "layout")
        return tuple(f.name for f in fields(cls) if f.name not in runtime)

    def calibration_options(self) -> dict[str, Any]:
        """The calibration options that shaped this calibration: the ``gac_*`` ones only for learned weights,
        ``lr_lowrank`` only with a low-rank branch."""
        names = [n for n in self.option_names() if n not in FORMAT_OPTIONS and (n != "lr_lowrank" or self.lowrank_rank)]
        if self.weighting != "gradient_aligned" or self.reconstruction == "none":
            names = [n for n in names if not n.startswith("gac_")]
        return {n: copy.deepcopy(getattr(self, n)) for n in names}

    def options(self) -> dict[str, Any]:
        """Every serialisable option as a flat dict (what ``GACConfig(**options)`` takes back)."""
        return {n: copy.deepcopy(getattr(self, n)) for n in self.option_names()}

    def to_dict(self) -> dict[str, Any]:
        """What config.json carries: the format options, the calibration options under ``"calibration"`` and, once
        calibrated, the ``"layout"``. Runtime inputs are never included."""
        levers = self.uses_levers()  # a checkpoint without levers is written as releases before them wrote it
        d: dict[str, Any] = {"quant_method": GACQuantizationMethod.GAC.value,
                             "format_version": FORMAT_VERSION if levers else 1}
        d.update({n: copy.deepcopy(getattr(self, n)) for n in FORMAT_OPTIONS if levers or n not in LEVER_DEFAULTS})
        d["calibration"] = self.calibration_options()
        if self.layout is not None:
            d["layout"] = self.layout.to_dict()
        return d

    def to_diff_dict(self) -> dict[str, Any]:
        """Only the options that differ from the defaults (plus ``quant_method`` and the layout, if any)."""
        default = GACConfig().options()
        d = {"quant_method": GACQuantizationMethod.GAC.value}
        d.update({k: v for k, v in self.options().items() if default[k] != v})
        if self.layout is not None:
            d["layout"] = f"{len(self.layout.layers)} converted layers"
        return d

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        """Build a config from ``to_dict()`` output (config.json) or from flat options; ``kwargs`` override. A key that
        is no option is an error (a typo such as ``w_bit`` would otherwise be dropped)."""
        if not isinstance(config_dict, dict):
            raise ValueError(f"a GACConfig is built from a dict of options, got {type(config_dict).__name__}")
        version = config_dict.get("format_version", FORMAT_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise ValueError(f"format_version {version!r} is not one this diffusers-gac reads (1 to {FORMAT_VERSION}); "
                             "a newer release of diffusers-gac wrote it: upgrade the package")
        calibration = config_dict.get("calibration") or {}
        if not isinstance(calibration, dict):
            raise ValueError(f"'calibration' must be a dict of calibration options, got {type(calibration).__name__}")
        known = set(cls.option_names()) | {"quant_method", "layout"}
        if config_dict.get("layout") is not None:
            # a calibrated checkpoint's calibration options only document how it was made: one this release does not
            # know (written by another release) is reported, not fatal; its format options must all be known
            dropped = sorted(k for k in calibration if k not in known)
            if dropped:
                logger.warning(f"ignoring calibration options this diffusers-gac does not know: {dropped}")
            calibration = {k: v for k, v in calibration.items() if k in known}
        flat = {k: v for k, v in config_dict.items() if k not in ("format_version", "calibration")}
        flat.update(calibration)
        unknown = [k for k in flat if k not in known]
        if unknown:
            raise ValueError("unknown GACConfig options: " + ", ".join(
                f"{k!r}{suggest(k, sorted(known))}" for k in unknown) + "; see help(diffusers_gac.GACConfig)")
        config = cls(**flat)
        unused = {k: v for k, v in kwargs.items() if not hasattr(config, k)}
        if unused and not return_unused_kwargs:  # a misspelt keyword is refused as a misspelt key is
            raise ValueError("unknown GACConfig options: " + ", ".join(
                f"{k!r}{suggest(k, sorted(known))}" for k in unused) + "; see help(diffusers_gac.GACConfig)")
        for k, v in kwargs.items():
            if hasattr(config, k):
                setattr(config, k, v)
        config.post_init()
        return (config, unused) if return_unused_kwargs else config

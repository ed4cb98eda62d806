"""Settings with a fixed set of values, named once. Torch-free, so that reading a config (and
checking these values before any run folder exists) needs no torch; every owner -- schedules,
ForecastModule, TMUModel, MemoryBank, the bank cache -- checks against the same tuple, through
:func:`check`, so that every refusal says the same thing: ``KEY: expected one of A, B, got 'x'``."""
from .errors import ChoiceError

SCHEDULE_KINDS = ("linear", "reverse", "none")        # scheduled sampling
DISTILL_DECAYS = ("none", "linear", "cosine")         # how lambda falls over training
DISTILL_SPANS = ("all", "input")                      # which steps add distillation terms
TMU_MODES = ("distill", "bank_read")                  # teachers as targets only, or also read
TRANSFER_MODES = TMU_MODES + ("mixture",)             # transfer.mode: a TMU mode, or the mixture of finetuned members
MIXTURE_GATINGS = ("lead", "pixel", "stack")          # mixture weights per lead time, also per pixel, or the radar recipe's CNN
MIXTURE_FIT_SPLITS = ("val", "train")                 # the clips a mixture's weights train on
MIX_STEPS = 100                                       # default steps that train a mixture's weights
MIX_LR = 0.05                                         # default learning rate of a mixture's weights (logits)
MIX_MEMO_BYTES = 1 << 29                              # baseline forecasts kept by clip while a mixture's weights fit
TMU_WEIGHTINGS = ("none", "softmax")                  # weighting across sources
TEACHER_INPUTS = ("ground_truth", "own")              # what the teachers read after T_in
CACHE_BANK = ("memory", "disk", "none")               # where a ground-truth bank is cached
AUGMENTS = ("flip", "rot90")                          # spatial augmentation of training clips
PRECISIONS = ("32-true", "32", "16-mixed", "16-true", "16", "bf16-mixed", "bf16-true", "bf16",
              "64-true", "64", "transformer-engine", "transformer-engine-float16")  # Lightning's
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")  # Lightning's
EVAL_SPLITS = ("train", "val", "test")                 # the splits every dataset builder returns
RESIZE_MODES = ("resize", "crop", "none")             # how readers bring frames to data.size
NORMS = ("none", "group")                              # a backbone's normalisation
MODEL_KINDS = ("backbone", "transfer", "mixture")     # runs alone; wraps a backbone and draws on teachers (TMU);
                                                      # or combines frozen members' forecasts
PROBE_STEPS = 0                                       # default K of zoo rank's finetuning probe: 0, zero-shot
# (on the transfer map's 8 cells, both families, the zero-shot score had the probe's hit rate, 0.875,
# and a higher rank correlation with the finetuned result, 0.88 against 0.69, at no training cost)

#: config key -> allowed values (checked by :func:`transmem.config.load_experiment`); the TMU's
#: options (``transfer.mode``, ``transfer.weighting``, ``transfer.distiller_norm``) carry theirs in
#: :class:`transmem.options.TMUOptions`
CONFIG_CHOICES = {
    "train.schedule": SCHEDULE_KINDS,
    "transfer.distill_decay": DISTILL_DECAYS,
    "transfer.distill_span": DISTILL_SPANS,
    "transfer.teacher_inputs": TEACHER_INPUTS,
    "transfer.cache_bank": CACHE_BANK,
    "train.augment": AUGMENTS,  # a list: each item one of these
    "train.precision": PRECISIONS,
    "train.accelerator": ACCELERATORS,
    "eval.split": EVAL_SPLITS,
    "data.resize": RESIZE_MODES,
    "model.norm": NORMS,
}


def problem(key: str, value, allowed) -> str:
    """The one message of a value outside ``allowed`` (config, CLI flags and library owners)."""
    return f"{key}: expected one of {', '.join(map(str, allowed))}, got {value!r}"


def check(key: str, value, allowed, error: type = ChoiceError) -> None:
    """Refuse ``value`` unless it is one of ``allowed``: an ``error`` (default
    :class:`~transmem.errors.ChoiceError`, a ValueError) with :func:`problem`'s message."""
    if value not in allowed:
        raise error(problem(key, value, allowed))

"""Shared defaults: the authors' GhostNetV2 ImageNet recipe (timm train.py flags in comments).

Every recipe file imports ``get_config()`` from here and overrides a handful of fields. Launch::

  python -m ghostnetv2_jax train --config configs/imagenet_ghostnetv2_100.py --workdir DIR \
      [--config.field=value ...]

An unknown field is an error (the config is locked). The global batch is ``batch_size``
images per optimizer update, whatever the number of devices; with ``grad_accum_steps = k`` each
device step sees ``batch_size / k`` images. The lr is given for ``lr_base_batch`` images and
scaled linearly to ``batch_size``.
"""
import ml_collections

from ghostnetv2_jax.data.config import default_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Model: a registered name plus GhostNet field overrides (cfgs, width, attention, ...).
    config.model = 'ghostnetv2_100'
    # GhostNet fields to override (None: the registered model's value), e.g. for the paper's
    # ablations: --config.model_overrides.attention=se, ...attention_kwargs="{'kernel': (7, 7)}".
    # attention_kwargs keys by variant (the module fields of layers/attention.py): dfc: kernel (K_H, K_W),
    # downsample, gate, gate_before_upsample, upsample; se: rd_ratio, gate; cbam: rd_ratio,
    # spatial_kernel, gate; coord: reduction, min_width.
    config.model_overrides = ml_collections.ConfigDict({
        'cfgs': ml_collections.FieldReference(None, field_type=tuple),    # the bottleneck table
        'width': ml_collections.FieldReference(None, field_type=float),
        'attention': ml_collections.FieldReference(None, field_type=str),  # dfc|se|cbam|coord|none
        'attention_kwargs': ml_collections.FieldReference(None, field_type=object),  # a dict
        'attention_blocks': ml_collections.FieldReference(None, field_type=tuple),
        'attention_position': ml_collections.FieldReference(None, field_type=str),  # ghost1|ghost2
        'depthwise_impl': ml_collections.FieldReference(None, field_type=str),      # auto|native|shift|xla
    })
    config.drop_rate = 0.2                 # --drop
    config.dtype = 'float32'               # compute dtype; 'bfloat16' keeps fp32 params and BN stats
    config.init_from = ''                  # start from weights: a .safetensors (convert/export), a
                                           # PyTorch file, another run's workdir (ghostnetv2_jax.weights),
                                           # or published weights, 'pretrained:NAME' (e.g.
                                           # 'pretrained:ghostnetv2_100': timm's, through the Hugging Face
                                           # cache; another class count gets a new head: fine-tuning)
    config.init_from_step = 'latest'       # a workdir's checkpoint: 'latest', 'best' or a step number
    config.init_from_ema = False           # a workdir's (or a training file's) EMA weights

    # Input pipeline: every field of ghostnetv2_jax.data.config.DataConfig, documented there.
    config.data = default_config()

    # Batch and length.
    config.batch_size = 1024               # global images per optimizer update (8 GPUs x 128)
    config.eval_batch_size = 1000
    config.grad_accum_steps = 1            # micro-batches per update (optax.MultiSteps)
    config.num_epochs = 450                # --epochs
    config.num_train_steps = -1            # > 0 overrides num_epochs (optimizer updates)

    # Optimizer: --opt rmsproptf --opt-eps .001 --weight-decay 1e-5, momentum 0.9, alpha 0.9.
    config.optimizer = 'rmsprop_tf'        # 'rmsprop_tf' | 'sgd' | 'adamw'
    config.learning_rate = 0.064           # --lr, for lr_base_batch images per update
    config.lr_base_batch = 1024            # lr scales by batch_size / lr_base_batch; 0: no scaling
    config.momentum = 0.9
    config.nesterov = False
    config.rmsprop_decay = 0.9             # RMSpropTF alpha
    config.opt_eps = 1e-3
    config.weight_decay = 1e-5             # L2 on the gradient; not on biases / BN / 1-D params
    config.grad_clip_norm = 0.0            # 0: no clipping (timm default)
    config.divergence_factor = 1e3         # stop (TrainingError, nothing saved) when a step's loss is
                                           # finite but this many times the first loss; 0: off

    # Schedule: --sched step --decay-epochs 2.4 --decay-rate .973 --warmup-lr 1e-6
    # --warmup-epochs 3 --lr-noise 0.42 0.9 (noise pct 0.67, std 1.0, seed 42).
    config.schedule = 'step'               # 'step' | 'cosine' | 'constant'
    config.schedule_unit = 'epoch'         # timm t_in_epochs: lr changes at epoch boundaries
    config.warmup_epochs = 3
    config.warmup_lr = 1e-6
    config.warmup_prefix = False           # timm default: decay counts epochs from 0
    config.decay_epochs = 2.4
    config.decay_rate = 0.973
    config.min_lr = 1e-5                   # cosine floor
    config.lr_noise = (0.42, 0.9)          # fractions of num_epochs; () disables
    config.lr_noise_pct = 0.67
    config.lr_noise_std = 1.0              # timm accepts --lr-noise-std and ignores it: 1.0 is timm's
    config.lr_noise_seed = 42              # timm's noise_seed, which train.py takes from --seed

    # Regularisation.
    config.label_smoothing = 0.1
    config.ema_decay = 0.9999              # --model-ema-decay; 0 disables the EMA copy
    config.ema_schedule = 'fixed'          # 'fixed': the authors' ModelEma (decay from update 1);
                                           # 'timm' / 'timm_warmup': current timm's ModelEmaV3
                                           # (decay 0 at update 1; --model-ema-warmup)

    # Knowledge distillation (GhostNetV3's recipe): loss = ce_weight * CE(student, labels) +
    # kd_weight * KD(student, teacher), the teacher in eval mode on the same images.
    config.distill = ml_collections.ConfigDict({
        'teacher': '',                     # a registered model name; '' disables distillation
        'teacher_checkpoint': '',          # its weights: any source config.init_from takes, e.g.
                                           # 'pretrained:ghostnetv2_160' (published weights; its classes
                                           # must be the student's)
        'teacher_step': 'latest',          # of a workdir: 'latest', 'best' or a step number
        'teacher_ema': False,              # a workdir's (or a training file's) EMA weights
        # the teacher's architecture overrides (a dict of GhostNet fields), as model_overrides
        'teacher_overrides': ml_collections.FieldReference(None, field_type=object),
        'loss': 'soft_ce',                 # 'soft_ce': -sum p_t log p_s | 'kl': KL(p_t || p_s)
        'temperature': 1.0,                # softens both distributions; the loss scales by T^2
        'kd_weight': 1.0,                  # the authors' --kd-loss-weight
        'ce_weight': 1.0,                  # the authors' --ori-loss-weight
    })

    # Bookkeeping.
    config.seed = 42
    config.log_every_steps = 100
    config.eval_every_epochs = 1
    config.checkpoint_every_steps = 0      # 0: at every evaluation (end of epoch)
    config.keep_checkpoints = 3            # latest N kept, plus the best by best_metric
    config.best_metric = 'ema_top1'        # 'top1' | 'ema_top1' (falls back to top1 without EMA)
    config.profile_steps = 0               # > 0: trace that many steps after a few warm-up steps
    config.distributed = 'auto'            # jax.distributed.initialize(): 'auto' | 'yes' | 'no'
    # Several processes without a cluster manager: all three, on every process (or the variables
    # JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). Unset under SLURM, Open MPI
    # and on TPU pod slices, which say it themselves.
    config.coordinator_address = ''        # host:port of process 0
    config.num_processes = 0
    config.process_id = -1
    return config

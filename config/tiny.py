"""Tiny model for a laptop CPU: a few million parameters, trains on the demo world in minutes.

    python pretrain.py config/tiny.py
"""
# model (see model.ModelConfig)
vocab_size = None      # None: the data's vocabulary (meta.json); the demo tokenizer has 1024
dim = 256
n_layers = 4
n_heads = 8
n_kv_heads = 4
max_seq_len = 256
rope_theta = 10000.0
tie_embeddings = True
dropout = 0.0
smear_keys = True      # lets a model this small learn to copy from its context (model.Attention.smear)

# data: the demo world (python prepare_data.py demo), ~0.3M training tokens
data_dir = "data/demo/pretrain"
out_dir = "out/pretrain"
# 16 x 256 = 4096 tokens per step; 1100 steps = 4.5M tokens, about 8 passes: the demo corpus states each fact
# many times over, and a model this small needs several passes to learn them.
batch_size = 16
grad_accum = 1
# Copy drills (pretrain.copy_drills): half of every batch from step 0. They form induction heads late, in the lr
# decay (~step 800); a drill-only phase first (copy_start/copy_end) costs the facts, arithmetic and translation
# the corpus would have taught in those steps, and the model never wins them back.
copy_frac = 0.5
# A small model takes a larger lr than the 1B recipe: 2e-3 after a short warmup, held (warmup-stable-decay),
# then down to 10% over the second half.
lr = 2e-3
min_lr = 2e-4
warmup_steps = 50
max_steps = 1100
lr_schedule = "wsd"
wsd_decay_frac = 0.5
eval_interval = 100
eval_iters = 10
log_interval = 20
sample_tokens = 40
# CPU: bf16 autocast where the CPU has native bf16 (dtype auto); no compile (minutes of compiling for a run of minutes)
device = "auto"
dtype = "auto"
compile = False

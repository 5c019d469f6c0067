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
conv_width = 8         # lets a model this small copy and read from its context (model.Attention.conv)

# data: the demo world (python prepare_data.py demo), ~0.7M training tokens
data_dir = "data/demo/pretrain"
out_dir = "out/pretrain"
# 16 x 256 = 4096 tokens per step; 1400 steps = 5.7M tokens, a quarter of them drills: ~6 passes. The corpus
# states each fact many times over, and a model this small needs several passes to learn them.
batch_size = 16
grad_accum = 1
# Copy drills (pretrain.copy_drills): a quarter of every batch from step 0. They form induction heads late, as the
# lr decays (~step 800); a drill-only phase first (copy_start/copy_end) costs the facts, arithmetic and translation
# the corpus would have taught in those steps, and the model never wins them back.
copy_frac = 0.25
align_docs = True      # a row starts at a document: a reading document's questions stay with its sources
# A small model takes a larger lr than the 1B recipe: 2e-3 after a short warmup, held (warmup-stable-decay),
# then down to 10% over the second half.
lr = 2e-3
min_lr = 2e-4
warmup_steps = 50
max_steps = 1400
lr_schedule = "wsd"
wsd_decay_frac = 0.5
eval_interval = 200
eval_iters = 10
log_interval = 20
sample_tokens = 40
# CPU: bf16 autocast where the CPU has native bf16 (dtype auto), compiled: 0.30 s a step instead of 0.45 on two
# cores, after ~50 s of compiling
device = "auto"
dtype = "auto"
compile = True

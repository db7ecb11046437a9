# The picker / index image: `epp serve ...` or `kvindex serve ...` (see deploy/).
# Multi-stage: the environment is built from the lock (uv.lock, the runtime dependencies only,
# the project itself non-editable) with the compiler toolchain for the index's C core; the
# runtime stage copies that environment and has no compiler.
FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements/uv.txt requirements/uv.txt
RUN pip install --no-cache-dir --require-hashes -r requirements/uv.txt
COPY pyproject.toml uv.lock setup.py README.md ./
COPY src ./src
COPY proto ./proto
ENV UV_PROJECT_ENVIRONMENT=/opt/venv UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy
RUN uv sync --locked --no-editable --no-cache --python /usr/local/bin/python3 \
 && /opt/venv/bin/python -c "import kvindex._native"

FROM python:3.11-slim
RUN useradd --uid 65532 --no-create-home --shell /usr/sbin/nologin kvindex
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
USER 65532:65532
# ext_proc, health, metrics, ZMQ events, index HTTP, index gRPC
EXPOSE 9002 9003 9090 5557 8080 50051
# llm-d's Helm chart sets only `args` (its flags): the entry point is the picker itself.
# Manifests running kvindex set `command`.
ENTRYPOINT ["epp", "serve"]
CMD ["--help"]

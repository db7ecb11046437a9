# The picker / index image: `epp serve ...` or `kvindex serve ...` (see deploy/).
# Multi-stage: wheels are built with the compiler toolchain, the runtime stage has none.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY proto ./proto
RUN pip install --no-cache-dir --upgrade pip \
 && pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --uid 65532 --no-create-home --shell /usr/sbin/nologin kvindex
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 65532:65532
ENV PYTHONUNBUFFERED=1
# ext_proc, health, metrics, ZMQ events, index HTTP, index gRPC
EXPOSE 9002 9003 9090 5557 8080 50051
ENTRYPOINT []
CMD ["epp", "serve", "--help"]

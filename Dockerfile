# The project's own image: the `ebr` CLI, trainer.task, Beam pipelines, index and retrieval
# service, and the steps of the retraining pipeline (retraining/, KFP). TF Serving runs from the
# official tensorflow/serving image instead.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 TF_USE_LEGACY_KERAS=1 \
    PIP_NO_CACHE_DIR=1 HOME=/tmp MPLCONFIGDIR=/tmp
WORKDIR /app
COPY setup.py README.md ./
COPY ebr ebr
COPY beam_pipelines beam_pipelines
COPY trainer trainer
COPY index index
COPY serving serving
COPY retraining retraining
COPY experiments experiments
RUN pip install . && useradd --uid 1000 --create-home --shell /usr/sbin/nologin ebr
USER 1000
# retrieval gRPC and its Prometheus metrics
EXPOSE 8600 9090
ENTRYPOINT []
CMD ["ebr", "--help"]

# syntax=docker/dockerfile:1
# One image: the API service (default) and the training/evaluation entrypoints.
#   docker build -t hellaswag-serve .
#   docker run --gpus all -p 8000:8000 hellaswag-serve          # GPU host (NVIDIA container toolkit)
#   docker run -p 8000:8000 hellaswag-serve                     # CPU host: falls back to the CPU
#   docker run -v model_store:/app/model_store hellaswag-serve train --lora 16 --max-steps 200
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
# PyPI's default Linux torch wheel is CUDA-enabled and runs on the CPU where no GPU is present.
ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}"
# Dependency layer before the source: code edits do not reinstall the dependencies.
COPY pyproject.toml README.md ./
RUN mkdir app && touch app/__init__.py && pip install . && pip uninstall -y hellaswag-serve && rm -rf app
COPY app ./app
RUN pip install --no-deps .
# Shipped fine-tuned entries (a small LoRA adapter) come from the repo; the embedded base is
# fetched and converted at build time, so the image runs offline.
COPY model_store ./model_store
RUN hellaswag-fetch-assets --model-store /app/model_store --data-dir /app/data --cache-dir /tmp/assets \
    && rm -rf /tmp/assets

FROM python:${PYTHON_VERSION}-slim AS runtime
ENV PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    APP_HOST=0.0.0.0 \
    APP_PORT=8000 \
    APP_MODEL_STORE_DIR=/app/model_store \
    APP_DATA_DIR=/app/data \
    APP_FETCH_ASSETS_ON_START=false
RUN useradd --create-home --uid 10001 app
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=app:app /app/model_store /app/model_store
COPY --from=builder --chown=app:app /app/data /app/data
COPY docker/entrypoint.sh /usr/local/bin/entrypoint.sh
WORKDIR /app
USER app
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD python -c "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4).status == 200 else 1)"
ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]
CMD ["serve"]

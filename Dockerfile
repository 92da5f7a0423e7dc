# One image for web, ingest, worker, beat and flower (docker-compose.yml gives each its command).

# Uppy and its language packs come from the npm registry; only their built files go into the final image.
FROM node:22-bookworm-slim AS uppy
WORKDIR /build
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STAGING_DIR=/data/staging

# qemu-img tells what an uploaded image really is (format, virtual size) before it goes to IMS.
RUN apt-get update \
    && apt-get install -y --no-install-recommends qemu-utils \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --system --create-home --uid 10001 portal
WORKDIR /app

COPY requirements.txt ./
# Flower (the workers' dashboard, docker compose --profile flower) only in the image.
RUN pip install -r requirements.txt "flower==2.2.0"

COPY . .
COPY --from=uppy /build/node_modules/uppy/dist node_modules/uppy/dist
COPY --from=uppy /build/node_modules/@uppy/locales/dist node_modules/@uppy/locales/dist
# Owned by portal: compose's `static` step copies them again into the proxy's volume at each start.
RUN python manage.py collectstatic --noinput -v 0 && chown -R portal:portal staticfiles

# Owned by portal: an empty named volume mounted here takes this owner when first used.
RUN mkdir -p /data/staging && chown portal:portal /data/staging
VOLUME /data/staging

USER portal
EXPOSE 8000
CMD ["gunicorn", "-c", "gunicorn.conf.py", "--bind", "0.0.0.0:8000", "portal.wsgi:application"]

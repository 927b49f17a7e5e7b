# jobqd daemon image. Build:  docker build --build-arg VERSION=0.1.0 -t jobqd .
# Run:    docker run -e JOBQD_DATABASE_URL=postgresql://user:pass@db/app \
#                    -v /path/to/jobqd.yaml:/etc/jobqd/jobqd.yaml:ro jobqd
# The image expects an external PostgreSQL; the embedded one is for laptops, not containers.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY jobqd ./jobqd
COPY migrations ./migrations
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="jobqd" \
      org.opencontainers.image.description="Postgres-backed job queue daemon for Python" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.org/jobqd" \
      org.opencontainers.image.documentation="https://example.org/jobqd/docs/operations.md" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    JOBQD_HEALTH_FILE=/run/jobqd/health
RUN groupadd --system --gid 10001 jobqd \
 && useradd --system --uid 10001 --gid jobqd --home-dir /var/lib/jobqd --create-home \
    --shell /usr/sbin/nologin jobqd \
 && install -d -o 10001 -g 10001 -m 0750 /run/jobqd
COPY --from=build /wheels /wheels
# With the dashboard extra (jinja2), so `http.dashboard: true` works in the image.
RUN pip install --no-cache-dir "$(echo /wheels/jobqd-*.whl)[dashboard]" && rm -rf /wheels
COPY packaging/docker/jobqd.yaml /etc/jobqd/jobqd.yaml
USER 10001:10001
WORKDIR /var/lib/jobqd
EXPOSE 9187
# The master drains on SIGTERM for shutdown_timeout (25s in the built-in config), then needs
# a few seconds to release what is left: give it 35s or more (docker stop -t 35; Kubernetes'
# default terminationGracePeriodSeconds of 30 fits the built-in 25s).
STOPSIGNAL SIGTERM
# Whatever config is mounted: the master rewrites $JOBQD_HEALTH_FILE from its loop, and
# `jobqd --health` fails when that file is stale, its pid gone, or it was removed at stop.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["jobqd", "--health"]
ENTRYPOINT ["jobqd"]
CMD ["-c", "/etc/jobqd/jobqd.yaml"]

# jobqd daemon image. Build:  docker build -t jobqd .
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
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 jobqd \
 && useradd --system --uid 10001 --gid jobqd --home-dir /var/lib/jobqd --create-home \
    --shell /usr/sbin/nologin jobqd
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY packaging/docker/jobqd.yaml /etc/jobqd/jobqd.yaml
USER 10001:10001
WORKDIR /var/lib/jobqd
EXPOSE 9187
# The master drains on SIGTERM; give it longer than shutdown_timeout (docker stop -t 45).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9187/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["jobqd"]
CMD ["-c", "/etc/jobqd/jobqd.yaml"]

# access-gateway: slim image, non-root, config at /etc/gateway/gateway.yaml
FROM python:3.11-slim

RUN useradd --system --uid 10001 --home-dir /var/lib/gateway --create-home gateway \
 && mkdir -p /etc/gateway /var/log/gateway/audit \
 && chown gateway:gateway /var/log/gateway/audit

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY plugins ./plugins
RUN pip install --no-cache-dir . && rm -rf /src

USER gateway
WORKDIR /var/lib/gateway
EXPOSE 8443 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD python -c "import sys, urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:8443/.gateway/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["gateway"]
CMD ["run", "-c", "/etc/gateway/gateway.yaml"]

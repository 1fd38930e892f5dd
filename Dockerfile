# derpkit serve as a drop-in for the derper Docker images (spec derper-cli §9).
#
# Flag defaults inside derpkit stay derper's; this image sets the Docker table's defaults
# with ENV, as the seed image does, and derpkit reads those variables itself, so the
# command is simply `derpkit serve`. See docs/docker.md.

# Base: python:3.11-slim on a named Debian release (bookworm), so a rebuild does not move to
# another Debian underneath; both stages use the same one.
# --- build: wheels for derpkit and its dependencies (ACME support included) ---------------
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY derpkit ./derpkit
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[acme]" \
 && cd /wheels && sha256sum *.whl > /wheels.sha256

# --- run --------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm
# The list of wheels (and their hashes) is copied in first: a layer cache (buildah's, at
# least) does not look inside the bind mount below, so without this a changed derpkit would
# be built into new wheels and the old ones would stay installed. It also records what the
# image contains.
COPY --from=build /wheels.sha256 /usr/local/share/derpkit/wheels.sha256
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels "derpkit[acme]" \
 && useradd --create-home --home-dir /home/derp --uid 1000 --shell /usr/sbin/nologin derp \
 && install -d -o derp -g derp -m 0700 /var/lib/derper /home/derp/derper-certs

# The seed image's defaults. HOSTNAME must be set here: Docker would otherwise fill it with
# the container ID and derpkit would take that as -hostname.
ENV DEV="false" \
    VERSION_FLAG="false" \
    ADDR=":443" \
    HTTP_PORT="80" \
    STUN_PORT="3478" \
    CONFIG_PATH="/var/lib/derper/derper.key" \
    CERT_MODE="manual" \
    CERT_DIR="derper-certs" \
    HOSTNAME="127.0.0.1" \
    RUN_STUN="true" \
    RUN_DERP="true" \
    FLAGHOME="" \
    MESH_PSKFILE="" \
    MESH_WITH="" \
    SECRETS_URL="" \
    SECRETS_PREFIX="prod/derp" \
    SECRETS_CACHEDIR="derper-secrets" \
    BOOTSTRAP_DNS="" \
    UNPUBLISHED_DNS="" \
    VERIFY_CLIENTS="true" \
    VERIFY_CLIENT_URL="" \
    VERIFY_FAIL_OPEN="true" \
    SOCKET="" \
    ACCEPT_CONNECTION_LIMIT="+Inf" \
    ACCEPT_CONNECTION_BURST="9223372036854775807" \
    TCP_KEEPALIVE_TIME="10m0s" \
    TCP_USER_TIMEOUT="15s" \
    TCP_WRITE_TIMEOUT="2s" \
    PYTHONUNBUFFERED="1"

# Not root. Ports 80/443 below 1024: Docker 20.10+ lets any user bind them inside the
# container's own network namespace (net.ipv4.ip_unprivileged_port_start=0); elsewhere pass
# --sysctl net.ipv4.ip_unprivileged_port_start=0 (docs/docker.md).
USER derp
WORKDIR /home/derp

EXPOSE 80/tcp 443/tcp 3478/udp
# Certificates (manual files, the generated self-signed IP cert, the ACME cache) and the
# server key; mount the host's /var/run/tailscale/tailscaled.sock for VERIFY_CLIENTS=true.
VOLUME ["/home/derp/derper-certs", "/var/lib/derper"]

HEALTHCHECK --interval=30s --timeout=20s --start-period=15s --retries=3 \
    CMD ["derpkit", "healthcheck", "--quiet"]

CMD ["derpkit", "serve"]

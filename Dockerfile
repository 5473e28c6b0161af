# The sidecar and agent images: FROM scratch, one statically linked binary
# each, so they build without a registry and stay a few MB.
# `cargo xtask images` builds the binaries and runs this with the staging
# directory (holding tpd-sidecar and tpd-agent) as context.

FROM scratch AS sidecar
COPY tpd-sidecar /tpd-sidecar
ENTRYPOINT ["/tpd-sidecar"]
CMD ["run"]

FROM scratch AS agent
# Runs as the "nonroot" uid with no shell and no writable root: what Pod
# Security Admission "restricted" accepts. Keep in sync with names::AGENT_UID.
COPY --chown=65532:65532 tpd-agent /tpd-agent
USER 65532:65532
ENTRYPOINT ["/tpd-agent"]

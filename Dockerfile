# The sidecar and agent images: FROM scratch, one statically linked binary
# each, so they build without a registry and stay a few MB.
# `cargo xtask images` builds the binaries and runs this with the staging
# directory (holding tpd-sidecar and tpd-agent) as context.

FROM scratch AS sidecar
COPY tpd-sidecar /tpd-sidecar
ENTRYPOINT ["/tpd-sidecar"]
CMD ["run"]

FROM scratch AS agent
# No shell, run with a read-only root. Its default user is the "nonroot" uid
# (names::AGENT_UID, keep in sync), which the outbound-only agent pod runs
# as; a swap runs it as the swapped container's user (cli/src/swap/identity.rs).
COPY --chown=65532:65532 tpd-agent /tpd-agent
USER 65532:65532
ENTRYPOINT ["/tpd-agent"]

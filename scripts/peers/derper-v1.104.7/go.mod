// Builds tailscale.com/cmd/derper at v1.104.7, the newest release the module proxy here
// serves. Every v1.104.x requires github.com/tailscale/setec@v0.0.0-20260824224040-f8d7a936837c,
// which the proxy refuses (403), so setec is pinned to the version v1.102.3 uses; derper
// only uses setec for -secrets-url, which no conformance case exercises.
module derpkit.local/derper104

go 1.27.4

require tailscale.com v1.104.7

replace github.com/tailscale/setec => github.com/tailscale/setec v0.0.0-20251203133219-2ab774e4129a

// goclient is a test peer: Tailscale's own DERP-over-HTTP client (tailscale.com/derp/derphttp,
// the code every Tailscale node runs) connected to one server, reporting every message it
// receives as one JSON line on stdout. The interop tests use it to show what a real Go
// client makes of frames Go derper never sends (Restarting, server Pings) and of our
// ServerInfo.
//
//	goclient -url http://127.0.0.1:PORT/derp [-for 10s] [-ack-pings [-mute-pongs]] [-send-to HEX -send-data S]
//
// First line: {"type":"ready","key":"<hex>"}. Received Pings are answered with a Pong when
// -ack-pings is given, as tailscaled does. A Recv error is reported and the client carries
// on: derphttp reconnects on the next Recv, and "gen" shows which connection a message came on.
package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	"go4.org/mem"
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"
)

var (
	flagURL      = flag.String("url", "", "DERP URL")
	flagFor      = flag.Duration("for", 10*time.Second, "how long to listen")
	flagAckPings = flag.Bool("ack-pings", false, "declare CanAckPings and answer server pings")
	flagMute     = flag.Bool("mute-pongs", false, "with -ack-pings: declare it but never answer (a hung node)")
	flagSendTo   = flag.String("send-to", "", "hex node key to send one packet to after connecting")
	flagSendData = flag.String("send-data", "", "payload for -send-to")
)

func emit(v map[string]any) {
	b, _ := json.Marshal(v)
	fmt.Println(string(b))
}

func main() {
	flag.Parse()
	priv := key.NewNode()
	c, err := derphttp.NewClient(priv, *flagURL, func(string, ...any) {}, netmon.NewStatic())
	if err != nil {
		emit(map[string]any{"type": "fatal", "err": err.Error()})
		os.Exit(1)
	}
	c.SetCanAckPings(*flagAckPings)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	err = c.Connect(ctx)
	cancel()
	if err != nil {
		emit(map[string]any{"type": "fatal", "err": err.Error()})
		os.Exit(1)
	}
	pub := priv.Public().Raw32()
	emit(map[string]any{"type": "ready", "key": hex.EncodeToString(pub[:])})
	if *flagSendTo != "" {
		raw, err := hex.DecodeString(*flagSendTo)
		if err != nil || len(raw) != 32 {
			emit(map[string]any{"type": "fatal", "err": "bad -send-to"})
			os.Exit(1)
		}
		if err := c.Send(key.NodePublicFromRaw32(mem.B(raw)), []byte(*flagSendData)); err != nil {
			emit(map[string]any{"type": "send_error", "err": err.Error()})
		}
	}
	deadline := time.Now().Add(*flagFor)
	go func() {
		time.Sleep(time.Until(deadline))
		c.Close()
	}()
	for time.Now().Before(deadline) {
		m, gen, err := c.RecvDetail()
		if err != nil {
			if time.Now().After(deadline) {
				break
			}
			emit(map[string]any{"type": "recv_error", "gen": gen, "err": err.Error()})
			time.Sleep(100 * time.Millisecond)
			continue
		}
		switch m := m.(type) {
		case derp.ServerInfoMessage:
			emit(map[string]any{"type": "server_info", "gen": gen,
				"rate": m.TokenBucketBytesPerSecond, "burst": m.TokenBucketBytesBurst})
		case derp.ServerRestartingMessage:
			emit(map[string]any{"type": "restarting", "gen": gen,
				"reconnect_in_ms": m.ReconnectIn.Milliseconds(), "try_for_ms": m.TryFor.Milliseconds()})
		case derp.PingMessage:
			emit(map[string]any{"type": "ping", "gen": gen, "data": hex.EncodeToString(m[:])})
			if *flagAckPings && !*flagMute {
				if err := c.SendPong(m); err != nil {
					emit(map[string]any{"type": "pong_error", "err": err.Error()})
				}
			}
		case derp.KeepAliveMessage:
			emit(map[string]any{"type": "keepalive", "gen": gen})
		case derp.HealthMessage:
			emit(map[string]any{"type": "health", "gen": gen, "problem": m.Problem})
		case derp.ReceivedPacket:
			src := m.Source.Raw32()
			emit(map[string]any{"type": "packet", "gen": gen, "src": hex.EncodeToString(src[:]), "data": string(m.Data)})
		case derp.PeerGoneMessage:
			p := m.Peer.Raw32()
			emit(map[string]any{"type": "peer_gone", "gen": gen, "peer": hex.EncodeToString(p[:]), "reason": int(m.Reason)})
		default:
			emit(map[string]any{"type": fmt.Sprintf("%T", m), "gen": gen})
		}
	}
}

// derpgen is the load generator bench/ drives both servers with. It is built on
// tailscale.com/derp's own client (the code real Tailscale nodes run), so the generator
// is identical for derpkit and Go derper and costs what a Tailscale client costs.
//
// Modes (one JSON object on stdout at the end):
//
//	derpgen flood     -url U -pairs N -size B -duration D [-rate PPS] [-src 127.0.1.1,...]
//	derpgen handshake -url U -duration D -concurrency K
//	derpgen idle      -url U -conns N -src 127.0.1.1,...   (prints "READY n", holds until stdin closes)
//
// Transports (every mode): plain HTTP (-url http://...), TLS (-url https://..., with
// -tls-ca FILE or -insecure, -tls-name for the SNI and verification name; TLS 1.3 only,
// and the fast start a Tailscale client does when the server's chain ends in a DERP
// meta-certificate), and WebSocket (-websocket, subprotocol "derp", over either). The
// WebSocket path uses the same libraries as derphttp's ts_debug_websockets client
// (github.com/coder/websocket and tailscale.com/net/wsconn), one binary message per write.
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coder/websocket"
	"go4.org/mem"
	"tailscale.com/derp"
	"tailscale.com/net/wsconn"
	"tailscale.com/types/key"
)

var (
	flagURL   = flag.String("url", "", "DERP URL (http://host:port/derp)")
	flagPairs = flag.Int("pairs", 4, "sender/receiver pairs (flood)")
	flagSize  = flag.Int("size", 1200, "packet payload bytes (flood)")
	flagDur   = flag.Duration("duration", 5*time.Second, "measurement time")
	flagRate  = flag.Float64("rate", 0, "total packets/s over all pairs (0 = as fast as TCP allows)")
	flagSrc   = flag.String("src", "", "comma-separated local source IPs, used round-robin")
	flagConns = flag.Int("conns", 1000, "connections (idle)")
	flagConc  = flag.Int("concurrency", 8, "parallel connect loops (handshake)")
	flagDrain = flag.Duration("drain", 500*time.Millisecond, "wait for in-flight packets after sending stops")
	flagCA    = flag.String("tls-ca", "", "PEM file of the CA that signed the server's certificate (https URLs)")
	flagInsec = flag.Bool("insecure", false, "do not verify the server's certificate (https URLs)")
	flagName  = flag.String("tls-name", "", "TLS server name (SNI and verification); default the URL's host")
	flagWS    = flag.Bool("websocket", false, "DERP over WebSocket (subprotocol derp) instead of the DERP upgrade")
	flagFast  = flag.Bool("fast-start", true, "over TLS 1.3, skip the 101 when the server sent a meta-certificate, as Tailscale clients do")
)

// tlsConf is nil for http URLs.
var tlsConf *tls.Config
var tlsVersion atomic.Uint32
var fastStarts atomic.Int64 // connections that skipped the 101 (meta-certificate seen)

var srcs []net.IP
var srcNext atomic.Uint64

func die(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "derpgen: "+format+"\n", a...)
	os.Exit(1)
}

// dialTCP opens TCP from the next -src address.
func dialTCP(ctx context.Context, addr string) (net.Conn, error) {
	d := net.Dialer{Timeout: 10 * time.Second}
	if len(srcs) > 0 {
		ip := srcs[srcNext.Add(1)%uint64(len(srcs))]
		d.LocalAddr = &net.TCPAddr{IP: ip}
	}
	return d.DialContext(ctx, "tcp", addr)
}

// metaKey returns the DERP key in a TLS 1.3 chain's meta-certificate (CN "derpkey" + 64 hex,
// serial = protocol version 1..255), or the zero key.
func metaKey(cs tls.ConnectionState) key.NodePublic {
	if cs.Version < tls.VersionTLS13 {
		return key.NodePublic{}
	}
	for _, c := range cs.PeerCertificates {
		hex, ok := strings.CutPrefix(c.Subject.CommonName, "derpkey")
		if !ok || c.SerialNumber == nil || c.SerialNumber.Sign() <= 0 || c.SerialNumber.BitLen() > 8 {
			continue
		}
		if k, err := key.ParseNodePublicUntyped(mem.S(hex)); err == nil {
			return k
		}
	}
	return key.NodePublic{}
}

// upgrade opens a connection and brings it to the point where derp.NewClient can start:
// the byte stream, its buffers, and the server key when fast start already learnt it.
func upgrade(u *url.URL) (net.Conn, *bufio.ReadWriter, key.NodePublic, error) {
	var zero key.NodePublic
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if *flagWS {
		hc := &http.Client{Transport: &http.Transport{
			DialContext:     func(ctx context.Context, _, addr string) (net.Conn, error) { return dialTCP(ctx, addr) },
			TLSClientConfig: tlsConf,
		}}
		wsu := *u
		c, res, err := websocket.Dial(ctx, wsu.String(), &websocket.DialOptions{
			HTTPClient: hc, Subprotocols: []string{"derp"},
		})
		if err != nil {
			return nil, nil, zero, err
		}
		if res != nil && res.TLS != nil {
			tlsVersion.Store(uint32(res.TLS.Version))
		}
		if c.Subprotocol() != "derp" {
			c.CloseNow()
			return nil, nil, zero, fmt.Errorf("server chose subprotocol %q", c.Subprotocol())
		}
		nc := wsconn.NetConn(context.Background(), c, websocket.MessageBinary, u.Host)
		return nc, bufio.NewReadWriter(bufio.NewReaderSize(nc, 64<<10), bufio.NewWriterSize(nc, 64<<10)), zero, nil
	}
	nc, err := dialTCP(ctx, u.Host)
	if err != nil {
		return nil, nil, zero, err
	}
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	var serverKey key.NodePublic
	if tlsConf != nil {
		tc := tls.Client(nc, tlsConf)
		if err := tc.HandshakeContext(ctx); err != nil {
			nc.Close()
			return nil, nil, zero, err
		}
		cs := tc.ConnectionState()
		tlsVersion.Store(uint32(cs.Version))
		if *flagFast {
			serverKey = metaKey(cs)
		}
		nc = tc
	}
	path := u.Path
	if path == "" || path == "/" {
		path = "/derp"
	}
	req := "GET " + path + " HTTP/1.1\r\nHost: " + u.Host + "\r\nUser-Agent: derpgen\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n"
	if !serverKey.IsZero() {
		req += derp.FastStartHeader + ": 1\r\n"
	}
	req += "\r\n"
	br := bufio.NewReaderSize(nc, 64<<10)
	bw := bufio.NewWriterSize(nc, 64<<10)
	if !serverKey.IsZero() {
		// Fast start: the request goes out with ClientInfo in derp.NewClient's flush.
		fastStarts.Add(1)
		bw.WriteString(req)
		return nc, bufio.NewReadWriter(br, bw), serverKey, nil
	}
	if _, err := io.WriteString(nc, req); err != nil {
		nc.Close()
		return nil, nil, zero, err
	}
	for first := true; ; first = false {
		line, err := br.ReadString('\n')
		if err != nil {
			nc.Close()
			return nil, nil, zero, err
		}
		if first && !strings.Contains(line, " 101 ") {
			nc.Close()
			return nil, nil, zero, fmt.Errorf("upgrade refused: %q", strings.TrimSpace(line))
		}
		if line == "\r\n" {
			break
		}
	}
	return nc, bufio.NewReadWriter(br, bw), zero, nil
}

// dial connects, upgrades and runs the derp client handshake up to ServerInfo.
func dial(u *url.URL, priv key.NodePrivate) (*derp.Client, net.Conn, error) {
	nc, brw, serverKey, err := upgrade(u)
	if err != nil {
		return nil, nil, err
	}
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	c, err := derp.NewClient(priv, nc, brw, func(string, ...any) {}, derp.CanAckPings(true), derp.ServerPublicKey(serverKey))
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	// Wait for ServerInfo: the server has admitted and registered us. (Under fast start the
	// ServerKey frame arrives here first; Recv skips it.)
	for {
		m, err := c.Recv()
		if err != nil {
			nc.Close()
			return nil, nil, err
		}
		if _, ok := m.(derp.ServerInfoMessage); ok {
			break
		}
	}
	nc.SetDeadline(time.Time{})
	return c, nc, nil
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime)
}

// Latency histogram shared with bench/pygen.py and bench/report.py: bucket b holds
// one-way delays d (microseconds) with floor(8*log2(d+1)) == b, about 9% wide.
const histBuckets = 400

func bucket(ns int64) int {
	us := float64(ns) / 1e3
	if us < 0 {
		us = 0
	}
	b := int(8 * math.Log2(us+1))
	if b >= histBuckets {
		b = histBuckets - 1
	}
	return b
}

func flood(u *url.URL) map[string]any {
	n := *flagPairs
	type pair struct {
		s, r   *derp.Client
		sc, rc net.Conn
	}
	pairs := make([]pair, n)
	for i := range pairs {
		s, sc, err := dial(u, key.NewNode())
		if err != nil {
			die("connect sender: %v", err)
		}
		rk := key.NewNode()
		r, rc, err := dial(u, rk)
		if err != nil {
			die("connect receiver: %v", err)
		}
		pairs[i] = pair{s, r, sc, rc}
	}
	var sent, recvd, recvBytes atomic.Int64
	var stop atomic.Bool
	lat := make([][histBuckets]int64, n)
	var wg, rwg sync.WaitGroup
	base := time.Now()
	cpu0 := cpuSeconds()
	size := *flagSize
	if size < 16 {
		size = 16
	}
	for i := range pairs {
		p := pairs[i]
		rwg.Add(1)
		go func(i int) {
			defer rwg.Done()
			var h [histBuckets]int64
			for {
				m, err := p.r.Recv()
				if err != nil {
					break
				}
				rp, ok := m.(derp.ReceivedPacket)
				if !ok || len(rp.Data) < 16 {
					continue
				}
				ts := int64(binary.LittleEndian.Uint64(rp.Data[8:16]))
				d := int64(time.Since(base)) - ts
				recvd.Add(1)
				recvBytes.Add(int64(len(rp.Data)))
				h[bucket(d)]++
			}
			lat[i] = h
		}(i)
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			buf := make([]byte, size)
			dst := p.r.PublicKey()
			var interval time.Duration
			if *flagRate > 0 {
				interval = time.Duration(float64(time.Second) * float64(n) / *flagRate)
			}
			next := time.Now()
			for seq := uint64(0); !stop.Load(); seq++ {
				if interval > 0 {
					next = next.Add(interval)
					if w := time.Until(next); w > 0 {
						time.Sleep(w)
					}
				}
				binary.LittleEndian.PutUint64(buf[0:8], seq)
				binary.LittleEndian.PutUint64(buf[8:16], uint64(time.Since(base)))
				if err := p.s.Send(dst, buf); err != nil {
					return
				}
				sent.Add(1)
			}
		}(i)
	}
	t0 := time.Now()
	time.Sleep(*flagDur)
	stop.Store(true)
	wg.Wait()
	sendWall := time.Since(t0).Seconds()
	time.Sleep(*flagDrain)
	cpu := cpuSeconds() - cpu0
	for _, p := range pairs {
		p.sc.Close()
		p.rc.Close()
	}
	rwg.Wait()
	hist := map[string]int64{}
	for _, h := range lat {
		for b, c := range h {
			if c > 0 {
				hist[fmt.Sprint(b)] += c
			}
		}
	}
	s, r := sent.Load(), recvd.Load()
	return map[string]any{
		"mode": "flood", "pairs": n, "size": size, "seconds": sendWall,
		"sent": s, "received": r, "received_bytes": recvBytes.Load(),
		"pps": float64(r) / sendWall, "loss": 1 - float64(r)/float64(max(s, 1)),
		"hist":        hist,
		"cpu_seconds": cpu, "wall_seconds": sendWall + flagDrain.Seconds(),
	}
}

func handshakes(u *url.URL) map[string]any {
	var ok, fail atomic.Int64
	ctx, cancel := context.WithTimeout(context.Background(), *flagDur)
	defer cancel()
	var wg sync.WaitGroup
	cpu0 := cpuSeconds()
	t0 := time.Now()
	keys := make([]key.NodePrivate, 64)
	for i := range keys {
		keys[i] = key.NewNode()
	}
	for w := 0; w < *flagConc; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := w; ctx.Err() == nil; i += *flagConc {
				// A fresh key each time would measure key generation, not the server.
				_, nc, err := dial(u, keys[i%len(keys)])
				if err != nil {
					fail.Add(1)
					time.Sleep(10 * time.Millisecond)
					continue
				}
				nc.Close()
				ok.Add(1)
			}
		}(w)
	}
	wg.Wait()
	wall := time.Since(t0).Seconds()
	return map[string]any{
		"mode": "handshake", "ok": ok.Load(), "failed": fail.Load(), "seconds": wall,
		"per_second": float64(ok.Load()) / wall, "cpu_seconds": cpuSeconds() - cpu0, "wall_seconds": wall,
	}
}

func idle(u *url.URL) map[string]any {
	n := *flagConns
	conns := make([]net.Conn, 0, n)
	var mu sync.Mutex
	var failed atomic.Int64
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32)
	cpu0 := cpuSeconds()
	t0 := time.Now()
	for i := 0; i < n; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c, nc, err := dial(u, key.NewNode())
			if err != nil {
				failed.Add(1)
				return
			}
			go func() { // keep reading so keepalives and pings are answered
				for {
					if _, err := c.Recv(); err != nil {
						return
					}
				}
			}()
			mu.Lock()
			conns = append(conns, nc)
			mu.Unlock()
		}()
	}
	wg.Wait()
	wall := time.Since(t0).Seconds()
	fmt.Printf("READY %d\n", len(conns))
	os.Stdout.Sync()
	io.Copy(io.Discard, os.Stdin) // hold until the harness closes stdin
	for _, c := range conns {
		c.Close()
	}
	return map[string]any{
		"mode": "idle", "conns": len(conns), "failed": failed.Load(), "connect_seconds": wall,
		"cpu_seconds": cpuSeconds() - cpu0,
	}
}

func main() {
	if len(os.Args) < 2 {
		die("usage: derpgen flood|handshake|idle [flags]")
	}
	mode := os.Args[1]
	flag.CommandLine.Parse(os.Args[2:])
	u, err := url.Parse(*flagURL)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		die("-url must be http://host:port/derp or https://host:port/derp, got %q", *flagURL)
	}
	if u.Scheme == "https" {
		tlsConf = &tls.Config{MinVersion: tls.VersionTLS13, ServerName: u.Hostname(),
			InsecureSkipVerify: *flagInsec, NextProtos: []string{"http/1.1"}}
		if *flagName != "" {
			tlsConf.ServerName = *flagName
		}
		if *flagCA != "" {
			pem, err := os.ReadFile(*flagCA)
			if err != nil {
				die("-tls-ca: %v", err)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				die("-tls-ca %s: no PEM certificate in it", *flagCA)
			}
			tlsConf.RootCAs = pool
		}
		if tlsConf.RootCAs == nil && !*flagInsec {
			die("an https -url needs -tls-ca FILE or -insecure")
		}
	} else if *flagCA != "" || *flagInsec || *flagName != "" {
		die("-tls-ca, -insecure and -tls-name need an https -url")
	}
	for _, s := range strings.Split(*flagSrc, ",") {
		if s = strings.TrimSpace(s); s != "" {
			ip := net.ParseIP(s)
			if ip == nil {
				die("bad -src address %q", s)
			}
			srcs = append(srcs, ip)
		}
	}
	var out map[string]any
	switch mode {
	case "flood":
		out = flood(u)
	case "handshake":
		out = handshakes(u)
	case "idle":
		out = idle(u)
	default:
		die("unknown mode %q", mode)
	}
	out["transport"] = transportName()
	if v := tlsVersion.Load(); v != 0 {
		out["tls_version"] = tls.VersionName(uint16(v))
		out["fast_starts"] = fastStarts.Load()
	}
	json.NewEncoder(os.Stdout).Encode(out)
}

func transportName() string {
	t := "http"
	if tlsConf != nil {
		t = "tls"
	}
	if *flagWS {
		t += "+ws"
	}
	return t
}

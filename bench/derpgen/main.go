// derpgen is the load generator bench/ drives both servers with. It is built on
// tailscale.com/derp's own client (the code real Tailscale nodes run), so the generator
// is identical for derpkit and Go derper and costs what a Tailscale client costs.
//
// Modes (one JSON object on stdout at the end):
//
//	derpgen flood     -url U -pairs N -size B -duration D [-rate PPS] [-src 127.0.1.1,...]
//	derpgen handshake -url U -duration D -concurrency K
//	derpgen idle      -url U -conns N -src 127.0.1.1,...   (prints "READY n", holds until stdin closes)
package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"tailscale.com/derp"
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
)

var srcs []net.IP
var srcNext atomic.Uint64

func die(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "derpgen: "+format+"\n", a...)
	os.Exit(1)
}

// dial opens TCP, does the HTTP upgrade by hand and runs the derp client handshake.
func dial(u *url.URL, priv key.NodePrivate) (*derp.Client, net.Conn, error) {
	d := net.Dialer{Timeout: 10 * time.Second}
	if len(srcs) > 0 {
		ip := srcs[srcNext.Add(1)%uint64(len(srcs))]
		d.LocalAddr = &net.TCPAddr{IP: ip}
	}
	nc, err := d.Dial("tcp", u.Host)
	if err != nil {
		return nil, nil, err
	}
	path := u.Path
	if path == "" || path == "/" {
		path = "/derp"
	}
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	req := "GET " + path + " HTTP/1.1\r\nHost: " + u.Host + "\r\nUser-Agent: derpgen\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n"
	if _, err := io.WriteString(nc, req); err != nil {
		nc.Close()
		return nil, nil, err
	}
	br := bufio.NewReaderSize(nc, 64<<10)
	bw := bufio.NewWriterSize(nc, 64<<10)
	for first := true; ; first = false {
		line, err := br.ReadString('\n')
		if err != nil {
			nc.Close()
			return nil, nil, err
		}
		if first && !strings.Contains(line, " 101 ") {
			nc.Close()
			return nil, nil, fmt.Errorf("upgrade refused: %q", strings.TrimSpace(line))
		}
		if line == "\r\n" {
			break
		}
	}
	c, err := derp.NewClient(priv, nc, bufio.NewReadWriter(br, bw), func(string, ...any) {}, derp.CanAckPings(true))
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	// Wait for ServerInfo: the server has admitted and registered us.
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
	if err != nil || u.Host == "" || u.Scheme != "http" {
		die("-url must be http://host:port/derp (plain HTTP on loopback), got %q", *flagURL)
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
	json.NewEncoder(os.Stdout).Encode(out)
}

// Command control serves Tailscale's own test control server (testcontrol, imported from the
// pinned tailscale.com module) on loopback for derpkit's end-to-end suite.
//
// The suite needs a real coordination server so that real tailscaled nodes register, learn
// each other's keys and addresses, and receive a DERP map whose regions are our relays. The
// DERP map comes from a JSON file and can be replaced while running (POST /e2e/derpmap), so
// one control server and one set of nodes serve every scenario of the suite. A second
// listener (-trap) is an HTTP proxy that refuses everything and logs each attempt: the nodes
// use it as HTTP(S)_PROXY, so any try at reaching the internet is recorded, not hidden.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"sync"

	"tailscale.com/tailcfg"
	"tailscale.com/tstest/integration/testcontrol"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address for the control server")
	trap := flag.String("trap", "127.0.0.1:0", "address for the refusing proxy")
	mapFile := flag.String("derpmap", "", "JSON file holding the initial tailcfg.DERPMap")
	authKey := flag.String("authkey", "", "auth key every node must present (empty: none)")
	flag.Parse()

	var dm tailcfg.DERPMap
	if *mapFile != "" {
		b, err := os.ReadFile(*mapFile)
		if err != nil {
			log.Fatalf("control: -derpmap: %v", err)
		}
		if err := json.Unmarshal(b, &dm); err != nil {
			log.Fatalf("control: -derpmap %s: %v", *mapFile, err)
		}
	}

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("control: -listen: %v", err)
	}
	tln, err := net.Listen("tcp", *trap)
	if err != nil {
		log.Fatalf("control: -trap: %v", err)
	}

	s := &testcontrol.Server{
		DERPMap:          &dm,
		RequireAuthKey:   *authKey,
		AllNodesSameUser: true,
		AllOnline:        true,
		ExplicitBaseURL:  "http://" + ln.Addr().String(),
		Logf:             func(format string, a ...any) {},
	}

	var mu sync.Mutex
	mux := http.NewServeMux()
	mux.HandleFunc("/e2e/derpmap", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			b, _ := json.Marshal(s.DERPMap)
			w.Write(b)
			return
		}
		var next tailcfg.DERPMap
		if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&next); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		mu.Lock()
		defer mu.Unlock()
		s.DERPMap = &next
		// UpdateNode re-stores one node unchanged and wakes every streaming map poll, so
		// each node is sent a fresh MapResponse carrying the new map.
		nodes := s.AllNodes()
		if len(nodes) > 0 {
			s.UpdateNode(nodes[0])
		}
		log.Printf("control: DERP map replaced (%d regions), %d nodes told", len(next.Regions), len(nodes))
		fmt.Fprintf(w, "%d\n", len(nodes))
	})
	mux.HandleFunc("/e2e/nodes", func(w http.ResponseWriter, r *http.Request) {
		type node struct {
			Name      string   `json:"name"`
			Key       string   `json:"key"`
			Addresses []string `json:"addresses"`
		}
		var out []node
		for _, n := range s.AllNodes() {
			nn := node{Name: n.Hostinfo.Hostname(), Key: n.Key.String()}
			for _, a := range n.Addresses {
				nn.Addresses = append(nn.Addresses, a.String())
			}
			out = append(out, nn)
		}
		b, _ := json.Marshal(out)
		w.Write(b)
	})
	mux.Handle("/", s)

	go func() {
		err := http.Serve(tln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			log.Printf("TRAP: proxy request %s %s (host %s)", r.Method, r.URL, r.Host)
			http.Error(w, "derpkit e2e: no internet here", http.StatusBadGateway)
		}))
		log.Fatalf("control: trap: %v", err)
	}()
	log.Printf("control: trap listening on http://%s", tln.Addr())
	log.Printf("control: listening on %s", s.BaseURL())
	log.Fatal(http.Serve(ln, mux))
}

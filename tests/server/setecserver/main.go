// setecserver runs setec's own HTTP API (github.com/tailscale/setec/server and its
// encrypted database, at the revision tailscale v1.102.3 pins) on a plain loopback
// listener, for derpkit's -secrets-url tests.
//
// The real `setec server` cannot run on a test machine: even with --dev it serves only
// through tsnet, which needs a Tailscale control server and a login. Everything here is
// setec's code except two things a tailnet would provide:
//
//   - the listener is plain TCP on 127.0.0.1 instead of tsnet, and
//   - WhoIs, which setec asks for the caller's Tailscale identity, is a stub that names
//     every caller "tests@derpkit.local" and grants it the actions in -allow (setec's
//     tailscale.com/cap/secrets capability, checked by setec's own ACL code).
//
// The database key is tink's DummyAEAD, as `setec server --dev` uses. On start it prints
// one JSON line, {"url":"http://127.0.0.1:PORT"}, then serves until killed.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"

	"github.com/tailscale/setec/acl"
	"github.com/tailscale/setec/audit"
	"github.com/tailscale/setec/db"
	"github.com/tailscale/setec/server"
	"github.com/tink-crypto/tink-go/v2/testutil"
	"tailscale.com/client/tailscale/apitype"
	"tailscale.com/tailcfg"
)

var (
	flagListen = flag.String("listen", "127.0.0.1:0", "address to serve the setec API on")
	flagState  = flag.String("state", "", "directory for the database (required)")
	flagAllow  = flag.String("allow", "get,info,put,activate,delete", "comma-separated actions granted to every caller on every secret; empty grants nothing")
)

func main() {
	flag.Parse()
	if *flagState == "" {
		log.Fatal("-state is required")
	}
	var actions []acl.Action
	for _, a := range strings.Split(*flagAllow, ",") {
		if a != "" {
			actions = append(actions, acl.Action(a))
		}
	}
	var capMap tailcfg.PeerCapMap
	if len(actions) > 0 {
		rule, err := json.Marshal(acl.Rule{Action: actions, Secret: []acl.Secret{"*"}})
		if err != nil {
			log.Fatal(err)
		}
		capMap = tailcfg.PeerCapMap{server.ACLCap: []tailcfg.RawMessage{tailcfg.RawMessage(rule)}}
	}
	whois := func(ctx context.Context, addr string) (*apitype.WhoIsResponse, error) {
		return &apitype.WhoIsResponse{
			Node:        &tailcfg.Node{Name: "derpkit-test-caller"},
			UserProfile: &tailcfg.UserProfile{ID: 1, LoginName: "tests@derpkit.local"},
			CapMap:      capMap,
		}, nil
	}

	ctx := context.Background()
	mux := http.NewServeMux()
	kdb, err := db.Open(filepath.Join(*flagState, "database"), &testutil.DummyAEAD{Name: "derpkit-tests"}, audit.New(io.Discard))
	if err != nil {
		log.Fatalf("opening database: %v", err)
	}
	if _, err := server.New(ctx, server.Config{DB: kdb, AuditLog: audit.New(io.Discard), WhoIs: whois, Mux: mux}); err != nil {
		log.Fatalf("setec server: %v", err)
	}
	ln, err := net.Listen("tcp", *flagListen)
	if err != nil {
		log.Fatal(err)
	}
	out, _ := json.Marshal(map[string]string{"url": "http://" + ln.Addr().String()})
	fmt.Println(string(out))
	os.Stdout.Sync()
	log.Fatal(http.Serve(ln, mux))
}

// The go.mod beside this file builds Tailscale's derper v1.104.7 unchanged; it exists only
// because the module proxy here refuses the setec version v1.104.7 asks for (see go.mod).

//go:build tools

package tools

import _ "tailscale.com/cmd/derper"

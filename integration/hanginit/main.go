// Command hanginit is a guest /init for tests of an agent that never answers: it keeps the guest alive and
// serves nothing.
package main

import "time"

func main() {
	for {
		time.Sleep(time.Hour)
	}
}

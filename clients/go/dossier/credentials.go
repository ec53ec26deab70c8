package dossier

import (
	"context"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
)

// BearerToken returns per-RPC credentials that send `authorization: Bearer <token>` with every
// call: how clinicians and patients authenticate (a token from the identity provider the nodes
// trust; docs/client-protocol.md §12). Pass it as grpc.WithPerRPCCredentials in
// Config.DialOptions, with TLS transport credentials: the token is never sent over plaintext.
func BearerToken(token string) credentials.PerRPCCredentials {
	return bearer(token)
}

type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

func (bearer) RequireTransportSecurity() bool { return true }

// BreakGlassHeader is the metadata key of a break-the-glass reason.
const BreakGlassHeader = "x-dossier-break-glass"

// WithBreakGlass returns ctx carrying a clinician's break-the-glass reason (8 to 512 bytes of
// text) for the Records calls made with it: they are served without a care relationship, put on
// the cluster's review list and recorded in the patient's audit chain with the reason.
func WithBreakGlass(ctx context.Context, reason string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, BreakGlassHeader, reason)
}

// The read API, with the key the user signed in with: kept in sessionStorage (this tab only),
// sent in the Authorization header, never in a URL.

const KEY = "mcp-meter.key";

export const signedIn = {
  key: () => sessionStorage.getItem(KEY),
  set: (key) => sessionStorage.setItem(KEY, key),
  clear: () => sessionStorage.removeItem(KEY),
};

// A portal token's claims ({customer, tenant}), or null for an API key. The claims are not
// secret (the server checks their signature); the pages only use them to know the customer.
export function portalClaims(key = signedIn.key()) {
  if (!key?.startsWith("mcpp_")) return null;
  try {
    const part = key.slice(5).split(".")[0].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
    return { tenant: claims.t, customer: claims.c, expiresAt: new Date(claims.e * 1000) };
  } catch {
    return null;
  }
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export async function get(path, params = {}) {
  const url = new URL(path, location.origin);
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  const answer = await fetch(url, { headers: { Authorization: `Bearer ${signedIn.key()}` } });
  if (!answer.ok) {
    let message = answer.statusText;
    try {
      message = (await answer.json()).message ?? message;
    } catch {
      // Not JSON: the status text says enough.
    }
    throw new ApiError(answer.status, message);
  }
  return answer;
}

export async function getJson(path, params) {
  return (await get(path, params)).json();
}

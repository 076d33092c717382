// Generates the <document>.ethers.json EIP-712 test vectors with ethers v6.
// Rerun (keep node_modules OUT of this repo; ethers is resolved from the cwd):
//   mkdir -p /tmp/vecgen && cd /tmp/vecgen && npm init -y && npm install ethers@6
//   cd /tmp/vecgen && node <repo>/tests/data/eip712/stablecoin/gen/gen_ethers.mjs [OUT_DIR]
// OUT_DIR defaults to the parent of this script's folder.
// After writing, every *.eth_account.json found next to the outputs is
// cross-checked: same digest as ethers, and its signature recovers (ethers) to the signer.
import { createRequire } from "node:module";
import { readFileSync, writeFileSync, existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const require = createRequire(join(process.cwd(), "noop.js"));
const ethers = require("ethers");

const outDir = resolve(process.argv[2] ?? join(dirname(fileURLToPath(import.meta.url)), ".."));

const KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
const wallet = new ethers.Wallet(KEY);
const SIGNER = wallet.address; // 0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266
const SPENDER = ethers.getAddress("0x70997970C51812dc3A010C7d01b50e0d17dc79C8");
const USDC_BASE = ethers.getAddress("0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913");
const PERMIT2 = ethers.getAddress("0x000000000022D473030F116dDEE9F6B43aC78BA3");

const usdcDomain = { name: "USD Coin", version: "2", chainId: 8453, verifyingContract: USDC_BASE };
const permit2Domain = { name: "Permit2", chainId: 8453, verifyingContract: PERMIT2 };

const eip3009Fields = [
  { name: "from", type: "address" },
  { name: "to", type: "address" },
  { name: "value", type: "uint256" },
  { name: "validAfter", type: "uint256" },
  { name: "validBefore", type: "uint256" },
  { name: "nonce", type: "bytes32" },
];

const DOCS = {
  eip3009_transfer: {
    domain: usdcDomain,
    primaryType: "TransferWithAuthorization",
    types: { TransferWithAuthorization: eip3009Fields },
    message: {
      from: SIGNER, to: SPENDER, value: "2500000", validAfter: "0", validBefore: "1900000000",
      nonce: "0x6b657977617264000000000000000000000000000000000000000000000e3009",
    },
  },
  eip3009_receive: {
    domain: usdcDomain,
    primaryType: "ReceiveWithAuthorization",
    types: { ReceiveWithAuthorization: eip3009Fields },
    message: {
      from: SIGNER, to: SPENDER, value: "2500000", validAfter: "0", validBefore: "1900000000",
      nonce: "0x6b65797761726400000000000000000000000000000000000000000000a3009b",
    },
  },
  eip2612_permit: {
    domain: usdcDomain,
    primaryType: "Permit",
    types: {
      Permit: [
        { name: "owner", type: "address" },
        { name: "spender", type: "address" },
        { name: "value", type: "uint256" },
        { name: "nonce", type: "uint256" },
        { name: "deadline", type: "uint256" },
      ],
    },
    message: { owner: SIGNER, spender: SPENDER, value: "1000000", nonce: "0", deadline: "1900000000" },
  },
  permit2_transfer_from: {
    domain: permit2Domain,
    primaryType: "PermitTransferFrom",
    types: {
      PermitTransferFrom: [
        { name: "permitted", type: "TokenPermissions" },
        { name: "spender", type: "address" },
        { name: "nonce", type: "uint256" },
        { name: "deadline", type: "uint256" },
      ],
      TokenPermissions: [
        { name: "token", type: "address" },
        { name: "amount", type: "uint256" },
      ],
    },
    message: {
      permitted: { token: USDC_BASE, amount: "3000000" },
      spender: SPENDER, nonce: "7", deadline: "1900000000",
    },
  },
  permit2_single: {
    domain: permit2Domain,
    primaryType: "PermitSingle",
    types: {
      PermitSingle: [
        { name: "details", type: "PermitDetails" },
        { name: "spender", type: "address" },
        { name: "sigDeadline", type: "uint256" },
      ],
      PermitDetails: [
        { name: "token", type: "address" },
        { name: "amount", type: "uint160" },
        { name: "expiration", type: "uint48" },
        { name: "nonce", type: "uint48" },
      ],
    },
    message: {
      details: { token: USDC_BASE, amount: "4000000", expiration: "1900000000", nonce: "0" },
      spender: SPENDER, sigDeadline: "1900000000",
    },
  },
};

let failures = 0;
for (const [docName, d] of Object.entries(DOCS)) {
  const digest = ethers.TypedDataEncoder.hash(d.domain, d.types, d.message);
  const signature = await wallet.signTypedData(d.domain, d.types, d.message);
  // ethers infers the primary type; make sure it agrees with the declared one.
  if (ethers.TypedDataEncoder.from(d.types).primaryType !== d.primaryType) throw new Error(`${docName}: primaryType mismatch`);
  // EIP712Domain as derived by ethers from the domain fields present.
  const payload = ethers.TypedDataEncoder.getPayload(d.domain, d.types, d.message);
  const out = {
    source: `ethers ${ethers.version}`,
    typed_data: {
      types: { EIP712Domain: payload.types.EIP712Domain, ...d.types },
      primaryType: d.primaryType,
      domain: d.domain,
      message: d.message,
    },
    digest,
    address: SIGNER,
    signature,
  };
  if (ethers.verifyTypedData(d.domain, d.types, d.message, signature) !== SIGNER) throw new Error(`${docName}: self-verify failed`);
  const file = join(outDir, `${docName}.ethers.json`);
  writeFileSync(file, JSON.stringify(out, null, 2) + "\n");
  console.log(`${docName}: ${digest}`);

  // Cross-check the eth-account vector, if present.
  const other = join(outDir, `${docName}.eth_account.json`);
  if (existsSync(other)) {
    const o = JSON.parse(readFileSync(other, "utf8"));
    const t = o.typed_data;
    const types = { ...t.types };
    delete types.EIP712Domain;
    const od = ethers.TypedDataEncoder.hash(t.domain, types, t.message);
    const rec = ethers.verifyTypedData(t.domain, types, t.message, o.signature);
    const ok = od === o.digest && o.digest === digest && rec === SIGNER && o.address === SIGNER;
    console.log(`  cross-check ${docName}.eth_account.json: digest ${od === digest ? "equal" : "DIFFERS"}, recovers ${rec} -> ${ok ? "OK" : "FAIL"}`);
    if (!ok) failures++;
  }
}
process.exit(failures ? 1 : 0);
